"""XLA compiler options per program kind: which convolution kernels XLA:CPU uses.

On XLA:CPU, jaxlib 0.10.2 hands convolutions and reductions to YNNPACK fusions by default;
the option ``xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_REDUCE`` keeps only the
reductions there, so that one program runs XLA's own Eigen convolutions ("eigen" below).
``auto`` chooses Eigen for both program kinds: it was faster for sampling, decoding and training
on every CPU measured, AVX2-only and AVX-512 (docs/benchmarks.md, "Convolution kernels on
XLA:CPU, by machine"); the kinds stay separate so that a CPU where they differ can be told
apart.

The environment variable ``CFM_CPU_CONVOLUTIONS`` (``auto``, ``eigen`` or ``ynnpack``)
overrides the choice for both kinds. The options go to single programs
(``jax.jit(..., compiler_options=...)``), never to the process's XLA_FLAGS, and only on the
CPU backend. Both kernels compute the same convolution; results differ by float rounding.
"""
from __future__ import annotations

import os

import jax

ENV_VAR = "CFM_CPU_CONVOLUTIONS"
CHOICES = ("auto", "eigen", "ynnpack")

# The YNNPACK fusion types the program keeps: reductions only. Convolutions (and the other
# fusion kinds) then run in XLA's own kernels (Eigen). An empty list would turn the reductions
# over to XLA too, whose reductions of large arrays are slow on XLA:CPU (the paper train step's
# gradient and parameter norms: docs/benchmarks.md, "Convolution kernels on XLA:CPU, by machine").
_EIGEN = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


def _choice() -> str:
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"{ENV_VAR}={os.environ[ENV_VAR]!r}; choose one of {CHOICES} "
                         "(or unset it: 'auto').")
    return value


def convolution_kernels(kind: str) -> str:
    """``'eigen'`` or ``'ynnpack'``: the kernels a ``kind`` (``'training'`` or ``'inference'``)
    program uses on XLA:CPU, from ``CFM_CPU_CONVOLUTIONS`` (``auto``: Eigen)."""
    if kind not in ("training", "inference"):
        raise ValueError(f"kind={kind!r}; 'training' or 'inference'.")
    choice = _choice()
    return "eigen" if choice == "auto" else choice


def describe() -> dict[str, str]:
    """``{'training': ..., 'inference': ...}``: the kernels each program kind gets on this CPU
    (for benchmark reports)."""
    return {kind: convolution_kernels(kind) for kind in ("training", "inference")}


def _options(kind: str, platform: str | None) -> dict | None:
    if (platform or jax.default_backend()) != "cpu":
        return None
    return dict(_EIGEN) if convolution_kernels(kind) == "eigen" else None


def inference(platform: str | None = None) -> dict | None:
    """Compiler options for sampling and decoding programs (``None``: the defaults) on
    ``platform`` (default: JAX's default backend)."""
    return _options("inference", platform)


def training(platform: str | None = None) -> dict | None:
    """Compiler options for the train step (``None``: the defaults) on ``platform`` (default:
    JAX's default backend; pass the mesh's when compiling for other devices, e.g. a TPU
    topology on a CPU host)."""
    return _options("training", platform)
