"""Shared timing helper of the benchmarks: compile ahead of time, warm up, median of repeats."""
import statistics
import time

import jax


def memory_bytes(compiled) -> int | None:
    """Arguments + outputs + temporaries of a compiled function (None where the backend does not say)."""
    try:
        m = compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes)
    except Exception:  # not every backend reports it
        return None


def timed(fn, *args, repeats: int):
    """``(output, compile_seconds, median_seconds, memory_bytes)`` of ``jax.jit(fn)(*args)``:
    lowered and compiled first, one warm-up call, then the median of ``repeats`` timed calls."""
    t = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t
    out = jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t)
    return out, compile_s, statistics.median(times), memory_bytes(compiled)
