"""Benchmark tables in the docs, written by the bench scripts that measure them.

A table lives between ``<!-- name -->`` and ``<!-- /name -->`` in a markdown file; a bench
script given the file replaces that block with its result, headed by where and when it was
measured (date, commit, CPU), so no table is copied by hand.
"""
from __future__ import annotations

import datetime
import os
import platform
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name} -->", f"<!-- /{name} -->"


def cpu_name() -> str:
    """Model, family, core count and whether the CPU has AVX-512 (the kernels differ)."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    family = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("cpu family")), "?")
    flags_line = next((line for line in info.splitlines() if line.startswith("flags")), "")
    simd = "AVX-512" if "avx512f" in flags_line else "no AVX-512"
    return f"{name or platform.machine()} (family {family}), {os.cpu_count()} cores, {simd}"


def commit() -> str:
    """The checkout's short commit, marked when tracked files have uncommitted changes."""
    try:
        out = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out + (" with uncommitted changes" if dirty else "")


def provenance() -> dict:
    """``{"date", "commit", "cpu"}`` of a measurement made now, for its JSON result."""
    return {"date": datetime.date.today().isoformat(), "commit": commit(), "cpu": cpu_name()}


def measured_by(script: str, result: dict) -> str:
    """"Measured by `bench/...` on <date> at commit <c>, on <cpu>" from a result's provenance."""
    if not all(result.get(k) for k in ("date", "commit", "cpu")):
        return f"Measured by `{script}` (date, commit and CPU not recorded in the result)"
    return f"Measured by `{script}` on {result['date']} at commit {result['commit']}, on {result['cpu']}"


def rewrite(text: str, name: str, block: str) -> str:
    """``text`` with everything between the markers of ``name`` replaced by ``block``."""
    begin, end = markers(name)
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise ValueError(f"the file needs exactly one {begin} ... {end} block")
    head, rest = text.split(begin)
    return f"{head}{begin}\n{block}\n{end}{rest.split(end, 1)[1]}"


def write_block(path: str, name: str, block: str) -> None:
    """Replaces the block ``name`` of the file ``path`` (nothing is written when the markers are
    missing)."""
    with open(path, encoding="utf-8") as f:
        text = rewrite(f.read(), name, block)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
