"""Return freed host memory to the operating system.

XLA's compiler and the state's initialisation free hundreds of MB to the C heap (glibc
malloc), which keeps them mapped: the process's resident size stays that much higher while
training allocates its large buffers elsewhere (glibc serves allocations above 128 KiB with
fresh mappings, not from the freed heap). ``malloc_trim(0)`` gives those pages back (how much,
for the paper's train step on XLA:CPU: docs/benchmarks.md, "Host memory").
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return libc.malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, musl): nothing to do
        return None


def release_freed_memory() -> bool:
    """Hands the C heap's free pages back to the OS (glibc ``malloc_trim(0)``); ``False``
    where the C library has no such call."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
