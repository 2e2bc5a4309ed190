"""XLA compiler options per program kind.

On XLA:CPU, jaxlib 0.10.2 hands convolutions to YNNPACK fusions by default. For the UNet's
forward pass (sampling), XLA's own Eigen convolutions are faster on the CPUs we measured: the
paper UNet's 40-point Euler sampler ran 1.8x faster at batch 8 and batch 1
(docs/benchmarks.md, ``bench/bench_vs_original.py``). Training keeps the default: its backward
pass was faster with YNNPACK at batch 1. The options go to single programs
(``jax.jit(..., compiler_options=...)``), never to the process's XLA_FLAGS, and only on the CPU
backend.
"""
from __future__ import annotations

import jax

# An empty fusion-type list turns YNNPACK fusions off for the program (Eigen kernels instead).
_CPU_INFERENCE = {"xla_cpu_experimental_ynn_fusion_type": ""}


def inference() -> dict | None:
    """Compiler options for sampling and decoding programs (``None``: the defaults)."""
    return dict(_CPU_INFERENCE) if jax.default_backend() == "cpu" else None
