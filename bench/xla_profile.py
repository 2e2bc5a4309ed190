"""Where the time of a compiled XLA:CPU program goes, by op category.

``profile_categories(compiled, run, calls)`` traces ``calls`` calls of ``run`` with
``jax.profiler``, reads the trace (XLA:CPU records one event per executed thunk, named after
its HLO instruction), and attributes each event's time to a category through that
instruction in the optimised HLO (``compiled.as_text()``): its opcode, what its fusion
computes, and the ``op_name`` metadata JAX gives it (the flax module path and the named
scopes ``attention``, ``optimizer``, ``ema``, ``metrics`` of the model and the train step).

The categories are those of ``bench/original_worker.py``'s torch profile, so the two sides
of ``bench/bench_vs_original.py --profile`` compare one to one. Thunks of control flow
(while, conditional, call) are not counted themselves: the thunks of their bodies are.
XLA's own (Eigen) convolutions are not traced beyond their dispatch; see
``convolution_estimated_from_wall``.
"""
from __future__ import annotations

import collections
import glob
import os
import re
import tempfile
import time

import jax
from jax.profiler import ProfileData

CATEGORIES = ("convolution", "group_norm", "attention", "dense", "elementwise", "transpose/copy",
              "optimizer", "ema", "metrics", "other")

_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%([\w.\-]+) = \S+ ([a-z\-]+)\(")
_CALLS = re.compile(r"calls=%([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CONTROL_FLOW = {"while", "conditional", "call", "async-start", "async-done"}
# GroupNorm layers of the UNet, by their flax names (cfm_jax/models/unet.py).
_NORM_PATH = re.compile(r"/(in_layers_0|out_layers_0|norm|out_0)/")


def parse_hlo(text: str) -> dict:
    """``{instruction name: (opcode, op_name, opcodes inside a fusion's computation)}``."""
    computations: dict[str, set] = collections.defaultdict(set)
    raw = []
    current = None
    for line in text.splitlines():
        header = _COMPUTATION.match(line)
        if header and not line.startswith(" "):
            current = header.group(1)
            continue
        inst = _INSTRUCTION.match(line)
        if not inst:
            continue
        name, opcode = inst.groups()
        computations[current].add(opcode)
        calls = _CALLS.search(line)
        op_name = _OP_NAME.search(line)
        raw.append((name, opcode, op_name.group(1) if op_name else "", calls.group(1) if calls else None))
    return {name: (opcode, op_name, computations.get(called, set()) if opcode == "fusion" else {opcode})
            for name, opcode, op_name, called in raw}


def category(opcode: str, op_name: str, inner: set) -> str:
    """The category of one instruction (first match wins: train-step scopes, then the model's)."""
    for scope in ("ema", "optimizer", "metrics"):
        if f"/{scope}/" in op_name:
            return scope
    if "convolution" in inner or "/conv_input_grad/" in op_name or "/conv_kernel_grad/" in op_name:
        return "convolution"  # the GEMM gradients of cfm_jax/models/conv.py included
    if _NORM_PATH.search(op_name):
        return "group_norm"
    if "/attention/" in op_name:
        return "attention"
    if "dot" in inner:
        return "dense"
    if inner <= {"transpose", "copy", "bitcast", "parameter", "reshape", "copy-start", "copy-done", "slice",
                 "concatenate", "pad", "dynamic-slice", "dynamic-update-slice"}:
        return "transpose/copy"
    if inner & {"add", "multiply", "subtract", "divide", "exponential", "logistic", "tanh", "maximum",
                "minimum", "select", "compare", "sqrt", "rsqrt", "power", "negate", "convert", "reduce",
                "broadcast", "cosine", "sine", "log", "abs"}:
        return "elementwise"
    return "other"


def profile_categories(compiled, run, calls: int = 2, top: int = 12) -> dict:
    """Trace ``calls`` calls of ``run()`` (which runs ``compiled`` and blocks) and sum the thunk
    time per category. Returns wall time per call, per-category milliseconds per call and shares,
    and the ``top`` most expensive instructions."""
    info = parse_hlo(compiled.as_text())
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp)
        t0 = time.perf_counter()
        for _ in range(calls):
            run()
        wall = (time.perf_counter() - t0) / calls
        jax.profiler.stop_trace()
        paths = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)
        if not paths:
            raise RuntimeError(f"jax.profiler wrote no trace under {tmp}")
        data = ProfileData.from_file(paths[0])
    per_cat: dict[str, float] = collections.defaultdict(float)
    per_inst: dict[str, float] = collections.defaultdict(float)
    for plane in data.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        for line in plane.lines:
            for event in line.events:
                inst = info.get(event.name)
                if inst is None or inst[0] in _CONTROL_FLOW:
                    continue
                per_cat[category(*inst)] += event.duration_ns / 1e6 / calls
                per_inst[event.name] += event.duration_ns / 1e6 / calls
    # XLA's own (Eigen) convolutions run on the Eigen thread pool: their thunk event covers only
    # the dispatch. Where a program has them (compile_options.inference()), the convolution time
    # is what the wall time leaves after the other categories (these programs are a chain of
    # dependent ops, so their thunks do not overlap much), marked as estimated.
    eigen_convs = any(info[name][0] == "convolution" for name in per_inst)  # unfused: Eigen's
    if eigen_convs:
        others = sum(ms for c, ms in per_cat.items() if c != "convolution")
        per_cat["convolution"] = max(per_cat.get("convolution", 0.0), wall * 1e3 - others)
    total = sum(per_cat.values())
    return {
        "wall_ms_per_call": round(wall * 1e3, 1),
        "thunk_ms_per_call": round(total, 1),
        "convolution_estimated_from_wall": eigen_convs,
        "categories_ms": {c: round(per_cat.get(c, 0.0), 1) for c in CATEGORIES},
        "categories_share": {c: round(per_cat.get(c, 0.0) / total, 3) if total else 0.0 for c in CATEGORIES},
        "top_instructions": [
            {"name": n, "ms": round(ms, 1), "category": category(*info[n]), "op_name": info[n][1][-120:]}
            for n, ms in sorted(per_inst.items(), key=lambda kv: -kv[1])[:top]],
    }
