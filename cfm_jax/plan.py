"""Compile-only TPU planning: does a config fit a slice, with which layout, how fast?

    python -m cfm_jax.plan --config configs/flow400_64-128/unet_base_psu.py --topology v5e:4x4
    python -m cfm_jax.plan --config configs/flow400_64-128/unet_base_psu.py --topology v4-32 \\
        --config.data.batch_size=128 --search 4 --json plan.json

JAX can compile for a TPU topology without the hardware: with ``libtpu`` installed,
``jax.experimental.topologies.get_topology_desc`` gives compile-only TPU devices, and a
``jax.jit`` lowered with shardings over a :class:`Mesh` of them compiles with the real
TPU compiler. ``compiled.memory_analysis()`` and ``compiled.cost_analysis()`` then say
what one chip would hold and compute. This module compiles the project's own programs
that way, on abstract inputs (nothing is allocated, no weights are read):

* ``train``: the update step of :func:`cfm_jax.trainer.make_train_step` at the config's
  global batch, mesh, remat, dtypes and gradient accumulation, the train state sharded
  as training shards it;
* ``eval``: the validation / ``eval.py`` step: sample the config's solver from the
  records' latents, decode with the first stage, score PSNR/SSIM/MSE against the image
  (weights replicated, the batch split over every chip, as the evaluator runs it);
* ``sample``: the upsampling pipeline of ``upsample``: the coupling from a low-res latent
  (PSU: decode, up-sample, encode) and the ODE/SDE solve to the high-res latent.

For each it reports, per chip: argument, output, temporary and peak bytes against the
chip's HBM (fits or not, headroom), FLOPs per call, a roofline estimate of the time per
call and the MFU that implies, and the compile time. The time is an *estimate*:
``cost_analysis()["optimal_seconds"]`` is not usable for these programs (it came out
negative for the paper step), so the estimate is ``max(compute, HBM traffic, collective
traffic)`` over the chip's published peak bf16 FLOP/s, HBM bandwidth and ICI bandwidth
(:data:`CHIPS`), i.e. a lower bound that assumes perfect overlap. Collective bytes are
read from the compiled HLO (all-gather, reduce-scatter, all-reduce, all-to-all,
collective-permute). XLA's cost analysis counts the body of a loop once; the samplers'
loops are corrected with the known number of steps (``(steps - 1) x`` the analytic UNet
forward of :mod:`cfm_jax.flops` per step; their HBM bytes scaled in proportion).

The layout search (``--search N``, at most N more compiles of the train step) tries, when
the config does not fit, full FSDP, rematerialisation (``save_matmuls``, then ``full``),
gradient accumulation and bf16 parameters, one after another until one fits; when it
fits, a larger per-chip batch and the other data/FSDP split. It recommends the layout
with the most predicted examples/s per chip among those that fit, as config overrides.
Results are cached per (program, config, topology, jax and libtpu version) in
``--cache_dir`` (the paper's train step compiled in 5-24 minutes on 2 cores).

Exit status: 0 when the config as given fits every program, 3 when it does not (the
recommendation, if the search found one, is printed), 2 for a usage error.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.metadata
import json
import math
import os
import re
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from absl import flags
from ml_collections import config_flags

from cfm_jax import cli, first_stage as fs_lib
from cfm_jax import flops as flops_lib, sampling, sde, sharding, solvers
from cfm_jax.ema import EMAConfig
from cfm_jax.evaluation import image_scores
from cfm_jax.model import CFMUpsampler
from cfm_jax.optim import make_optimizer
from cfm_jax.solvers import SolverSpec
from cfm_jax.trainer import abstract_train_state, make_train_step

PROGRAMS = ("train", "eval", "sample")
EXIT_DOES_NOT_FIT = 3
GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    """Published per-chip figures (Google Cloud TPU documentation), used for fit and roofline."""

    name: str
    hbm_bytes: int
    peak_bf16_flops: float  # dense bf16 FLOP/s
    hbm_bytes_per_s: float
    ici_bytes_per_s: float  # all ICI links of one chip together, one direction
    dims: int  # 2-D (v5e, v6e) or 3-D (v4, v5p) torus


# device_kind of the compile-only devices -> spec
CHIPS = {
    "TPU v4": ChipSpec("v4", 32 * GiB, 275e12, 1228e9, 300e9, 3),
    "TPU v5 lite": ChipSpec("v5e", 16 * GiB, 197e12, 819e9, 200e9, 2),
    "TPU v5": ChipSpec("v5p", 95 * GiB, 459e12, 2765e9, 600e9, 3),
    "TPU v6 lite": ChipSpec("v6e", 32 * GiB, 918e12, 1640e9, 448e9, 2),
}
_GENERATIONS = {"v4": 3, "v5e": 2, "v5litepod": 2, "v5p": 3, "v6e": 2}
# chips -> torus shape of the usual slices
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
              512: "8x8x8"}


class PlanError(ValueError):
    """A usage error of the planner (bad topology, libtpu missing, a config it cannot plan)."""


# --------------------------------------------------------------------------- topology
def topology_name(text: str) -> str:
    """``v5e:4x4``-style topology name for a topology or a Cloud TPU accelerator type
    (``v4-32`` = 32 TensorCores = 16 chips, ``v5p-8`` = 4 chips, ``v5litepod-16`` and
    ``v6e-16`` = 16 chips)."""
    text = text.strip()
    m = re.fullmatch(r"(v4|v5e|v5p|v6e):(\d+(?:x\d+)+)", text)
    if m:
        return text
    m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", text)
    if not m:
        raise PlanError(f"--topology {text!r}: give a topology like v5e:4x4, v4:2x2x4, v5p:2x2x1 or an "
                        "accelerator type like v4-32, v5litepod-16, v5p-8, v6e-16.")
    gen, n = m.group(1), int(m.group(2))
    chips = n // 2 if gen in ("v4", "v5p") else n  # v4 / v5p types count TensorCores, 2 per chip
    shapes = _SHAPES_3D if _GENERATIONS[gen] == 3 else _SHAPES_2D
    if chips not in shapes:
        raise PlanError(f"--topology {text!r}: {chips} chips is not a slice size this planner knows "
                        f"({sorted(shapes)}); give the topology explicitly, e.g. {gen.replace('v5litepod', 'v5e')}:"
                        f"{shapes[16]}.")
    return f"{'v5e' if gen == 'v5litepod' else gen}:{shapes[chips]}"


def _libtpu_version() -> str:
    try:
        return importlib.metadata.version("libtpu")
    except Exception:  # not installed
        return ""


def tpu_devices(topology: str) -> list:
    """Compile-only TPU devices of ``topology`` (one per chip: v4 in megacore mode, as JAX
    uses it on real v4 slices)."""
    name = topology_name(topology)
    if not _libtpu_version():
        raise PlanError("libtpu is not installed: pip install 'libtpu==0.0.42.*' (the version jax[tpu]==0.10.2 "
                        "pins; it is in requirements-test.txt) to compile for TPUs on this machine.")
    # libtpu wants to know its hosts even to compile; a CPU machine has none. Set before the
    # TPU client is first created (importing jax alone does not create it).
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # compile-only use touches no chip: several planners (or a test and its subprocesses) may
    # load libtpu at once, which its lock file would otherwise refuse
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_STDERR_LOG_LEVEL", "3")
    os.environ.setdefault("TPU_MIN_LOG_LEVEL", "3")
    from jax.experimental import topologies  # lazy: libtpu-related (compile-only TPU devices), only for a plan

    kwargs = {"chip_config_name": "megacore"} if name.startswith("v4:") else {}
    dims = [int(d) for d in name.split(":")[1].split("x")]
    if len(dims) == 2 and math.prod(dims) < 4:  # a single-chip host (v5e:1x1): libtpu assumes 2x2 hosts
        kwargs["chips_per_host_bounds"] = (dims[0], dims[1], 1)
    try:
        devices = list(topologies.get_topology_desc(topology_name=name, platform="tpu", **kwargs).devices)
    except Exception as e:  # libtpu rejects the topology
        raise PlanError(f"libtpu cannot describe topology {name!r}: {str(e).splitlines()[0]}") from e
    if devices[0].device_kind not in CHIPS:
        raise PlanError(f"No chip figures for {devices[0].device_kind!r}; known: {sorted(CHIPS)}.")
    return devices


# --------------------------------------------------------------------------- layouts
@dataclasses.dataclass(frozen=True)
class Layout:
    """The knobs the search turns; each is a config key."""

    data: int
    fsdp: int
    remat: str
    param_dtype: str
    grad_accum: int
    batch_size: int  # global

    @classmethod
    def of(cls, config, n_chips: int) -> "Layout":
        data, fsdp = sharding.mesh_shape(n_chips, config.mesh.data, config.mesh.fsdp)
        return cls(data=data, fsdp=fsdp, remat=config.model.remat,
                   param_dtype=config.model.param_dtype, grad_accum=int(config.optim.grad_accum_steps),
                   batch_size=int(config.data.batch_size))

    def apply(self, config):
        c = copy.deepcopy(config)
        with c.unlocked():
            c.mesh.data, c.mesh.fsdp = self.data, self.fsdp
            c.model.remat = self.remat
            c.model.param_dtype = self.param_dtype
            c.optim.grad_accum_steps = self.grad_accum
            c.data.batch_size = self.batch_size
        return c

    def overrides(self, base: "Layout") -> list[str]:
        """``--config.*`` flags that turn ``base`` into this layout."""
        keys = {"data": "mesh.data", "fsdp": "mesh.fsdp", "remat": "model.remat",
                "param_dtype": "model.param_dtype", "grad_accum": "optim.grad_accum_steps",
                "batch_size": "data.batch_size"}
        return [f"--config.{keys[f]}={getattr(self, f)}" for f in keys if getattr(self, f) != getattr(base, f)]

    def describe(self, n_chips: int) -> str:
        per_chip = self.batch_size / n_chips
        parts = [f"data={self.data} fsdp={self.fsdp}", f"batch {self.batch_size} ({per_chip:g}/chip)"]
        if self.grad_accum > 1:
            parts.append(f"accum {self.grad_accum}")
        if self.remat != "none":
            parts.append(f"remat {self.remat}")
        if self.param_dtype != "float32":
            parts.append(f"params {self.param_dtype}")
        return ", ".join(parts)


# --------------------------------------------------------------------------- programs
def _with_sharding(tree, sharding_fn):
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding_fn(s)), tree)


def lower_program(program: str, config, devices) -> tuple[Any, dict]:
    """``(lowered, info)`` of one program for ``config`` on ``devices``: ``info`` has the
    per-chip batch, the model FLOPs per call (analytic) and the loop correction."""
    mesh = sharding.make_mesh(config.mesh, devices)
    n = len(devices)
    bs = int(config.data.batch_size)
    sharding.check_batch_size(bs, mesh)
    fs = fs_lib.build_first_stage(config, abstract=True)
    ups = CFMUpsampler(config, first_stage=fs)
    latent = ups.latent_size(config.data.image_size)
    lowres_latent = ups.latent_size(config.data.lowres_size)
    c = fs.latent_channels
    batch_sh = sharding.batch_sharding(mesh)
    rep = sharding.replicated(mesh)

    def batched(shape, dtype=jnp.float32):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sh)

    fwd_per_example = flops_lib.unet_forward_flops(config.model, latent)
    if program == "train":
        accum = int(config.optim.grad_accum_steps)
        if accum > 1:
            sharding.check_batch_size(bs // accum, mesh, "data.batch_size / optim.grad_accum_steps")
        tx, schedule = make_optimizer(config.optim)
        state = abstract_train_state(ups, tx, latent, mesh, config.mesh.fsdp_min_size)
        step = make_train_step(ups, tx, schedule, EMAConfig.from_config(config.ema), mesh, grad_accum_steps=accum,
                               state_sharding=jax.tree.map(lambda a: a.sharding, state))
        # records' latents; latent_lowres already PSU-up-sampled to the high-res grid
        batch = {"latent": batched((bs, latent, latent, c)), "latent_lowres": batched((bs, latent, latent, c))}
        with jax.set_mesh(mesh):
            lowered = step.lower(state, batch)
        model_flops = 3 * fwd_per_example * bs / n
        # a scan over micro-batches: XLA counts its body (one micro-batch) once
        loop = {"trips": accum, "per_trip_flops": 3 * fwd_per_example * (bs // accum) / n}
        return lowered, {"per_chip_batch": bs / n, "model_flops": model_flops, "loop": loop}

    solver = SolverSpec.from_config(config.sample)
    params = _with_sharding(jax.eval_shape(lambda r: ups.init(r, latent), jax.random.PRNGKey(0)), lambda s: rep)
    fs_arg = _with_sharding(fs, lambda s: rep)
    keys = batched((bs, 2), jnp.uint32)
    if solver.is_adaptive:
        loop = None  # unknown number of steps: the FLOPs are those of one step
        nfe = None
    else:
        nfe = solver.expected_nfe()
        stages = (sde.SDE_STAGES[solver.method[len(solvers.SDE_PREFIX):]] if solver.is_sde
                  else sampling.FIXED_STAGES[solver.method])  # velocity evaluations per loop trip
        loop = {"trips": solver.num_steps - 1, "per_trip_flops": stages * fwd_per_example * bs / n}
    if program == "eval":
        def eval_step(params, fs, batch, keys):  # the scores of the evaluator's step
            images, result = ups.predict(params, batch, keys, solver=solver, first_stage=fs)
            return image_scores(images, batch["image"]), result.nfe

        size = int(config.data.image_size)
        batch = {"latent": batched((bs, latent, latent, c)), "latent_lowres": batched((bs, latent, latent, c)),
                 "image": batched((bs, size, size, 3))}
        lowered = jax.jit(eval_step).lower(params, fs_arg, batch, keys)
    elif program == "sample":
        def sample(params, fs, lowres, keys):
            return ups.sample(params, fs_lib.scale_latents(fs, lowres), keys, size=latent, solver=solver, first_stage=fs).x

        lowered = jax.jit(sample).lower(params, fs_arg, batched((bs, lowres_latent, lowres_latent, c)), keys)
    else:
        raise PlanError(f"Unknown program {program!r}; choose from {PROGRAMS}.")
    model_flops = None if nfe is None else nfe * fwd_per_example * bs / n
    return lowered, {"per_chip_batch": bs / n, "model_flops": model_flops, "loop": loop}


_COLLECTIVE = re.compile(r"=\s*(.*?)\s(all-gather|reduce-scatter|all-reduce|all-to-all|collective-permute)"
                         r"(-start)?\((.*)$")
_SHAPE = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|f16|bf16|f32|f64|f8e4m3fn|f8e5m2)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
          "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}


def _shape_bytes(text: str) -> int:
    return sum(_BYTES[t] * math.prod(int(d) for d in dims.split(",") if d) for t, dims in _SHAPE.findall(text))


def collective_bytes(hlo_text: str) -> int:
    """Bytes one chip moves through collectives in a compiled HLO module: per op the larger
    of its operands and its result (an all-gather's result, a reduce-scatter's operand);
    all-reduce counted twice (reduce-scatter + all-gather). Loop bodies counted once."""
    total = 0
    for line in hlo_text.splitlines():
        m = _COLLECTIVE.search(line)
        if m is None:
            continue
        result, op, operands = m.group(1), m.group(2), m.group(4)
        operands = re.split(r"\b(?:channel_id|replica_groups|dimensions|to_apply|metadata)=", operands)[0]
        b = max(_shape_bytes(result), _shape_bytes(operands))
        total += 2 * b if op.startswith("all-reduce") else b
    return total


def compiler_numbers(compiled) -> dict:
    """What the TPU compiler says of one compiled program, per chip (kept in the cache)."""
    m = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"argument_bytes": int(m.argument_size_in_bytes), "output_bytes": int(m.output_size_in_bytes),
            "alias_bytes": int(m.alias_size_in_bytes), "temp_bytes": int(m.temp_size_in_bytes),
            "generated_code_bytes": int(m.generated_code_size_in_bytes),
            "xla_flops": float(cost.get("flops", 0.0)), "xla_bytes_accessed": float(cost.get("bytes accessed", 0.0)),
            "xla_optimal_seconds": float(cost.get("optimal_seconds", float("nan"))),
            "hlo_collective_bytes": float(collective_bytes(compiled.as_text()))}


def estimate(raw: dict, chip: ChipSpec, info: dict, *, margin: float = 0.0) -> dict:
    """Fit, headroom and the roofline estimate from the compiler's numbers ``raw`` and the
    program's ``info`` (per-chip batch, analytic model FLOPs, known loop)."""
    peak = (raw["argument_bytes"] + raw["output_bytes"] - raw["alias_bytes"] + raw["temp_bytes"]
            + raw["generated_code_bytes"])
    usable = int(chip.hbm_bytes * (1.0 - margin))
    xla_flops, xla_bytes = raw["xla_flops"], raw["xla_bytes_accessed"]
    coll = raw.get("hlo_collective_bytes", raw.get("collective_bytes", 0.0))
    flops, hbm_bytes = xla_flops, xla_bytes
    loop = info.get("loop")
    if loop and loop["trips"] > 1 and xla_flops > 0:
        # XLA counted the loop body once: add the other trips (the body's bytes in proportion)
        extra = (loop["trips"] - 1) * loop["per_trip_flops"]
        body_share = min(loop["per_trip_flops"] / xla_flops, 1.0)
        flops = xla_flops + extra
        hbm_bytes = xla_bytes * (1.0 + (loop["trips"] - 1) * body_share)
        coll = coll * (1.0 + (loop["trips"] - 1) * body_share)
    model_flops = info.get("model_flops")
    undercount = 1.0
    if model_flops and 0 < flops < model_flops:
        # The compiler put part of the program in loops of its own (seen under memory pressure:
        # the paper step at 256² latents on v5e): their bodies are counted once too. The model's
        # FLOPs are a floor; bytes are scaled by the same factor.
        undercount = model_flops / flops
        flops, hbm_bytes, coll = model_flops, hbm_bytes * undercount, coll * undercount
    times = {"compute": flops / chip.peak_bf16_flops, "hbm": hbm_bytes / chip.hbm_bytes_per_s,
             "collectives": coll / chip.ici_bytes_per_s}
    seconds = max(times.values())
    return {
        "peak_bytes": peak, "hbm_bytes": chip.hbm_bytes, "usable_bytes": usable, "fits": peak <= usable,
        "headroom_bytes": usable - peak, "flops": flops, "bytes_accessed": hbm_bytes, "collective_bytes": coll,
        "xla_undercount_factor": undercount, "roofline_seconds": times, "bound": max(times, key=times.get),
        "predicted_seconds": seconds, "per_chip_batch": info["per_chip_batch"], "model_flops": model_flops,
        "loop": loop, "predicted_examples_per_s_per_chip": info["per_chip_batch"] / seconds if seconds > 0 else None,
        "predicted_mfu": (model_flops / (seconds * chip.peak_bf16_flops)) if (model_flops and seconds > 0) else None,
    }


def analyse(compiled, chip: ChipSpec, info: dict, *, margin: float = 0.0) -> dict:
    """The plan's numbers of one compiled program (per chip)."""
    raw = compiler_numbers(compiled)
    return {**raw, **estimate(raw, chip, info, margin=margin)}


# --------------------------------------------------------------------------- planning
def _cache_key(program: str, config, topology: str, margin: float) -> str:
    relevant = {k: config[k].to_dict() for k in ("model", "mesh", "flow", "coupling", "optim", "ema", "sample")}
    relevant["data"] = {k: config.data[k] for k in ("batch_size", "image_size", "lowres_size")}
    relevant["first_stage"] = {k: config.first_stage[k] for k in ("name", "dtype", "tile_size", "tile_overlap",
                                                                  "scale_factor")}
    blob = json.dumps({"program": program, "config": relevant, "topology": topology, "margin": margin,
                       "jax": jax.__version__, "libtpu": _libtpu_version(), "v": 1}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class Planner:
    """Compiles programs for one topology, with a result cache on disk."""

    def __init__(self, topology: str, *, cache_dir: str | None = None, margin: float = 0.0,
                 log: Callable[[str], None] = print):
        self.topology = topology_name(topology)
        self.devices = tpu_devices(self.topology)
        self.chip = CHIPS[self.devices[0].device_kind]
        self.n_chips = len(self.devices)
        self.cache_dir = cache_dir
        self.margin = margin
        self.log = log
        self.compiles = 0

    def measure(self, program: str, config) -> dict:
        """The plan numbers of ``program`` for ``config`` (cached); ``error`` instead when the
        program cannot be built for this slice (e.g. a batch the chips do not divide)."""
        key = _cache_key(program, config, self.topology, self.margin)
        path = os.path.join(self.cache_dir, f"{key}.json") if self.cache_dir else None
        if path and os.path.exists(path):
            with open(path) as f:
                cached = json.load(f)
            if "error" not in cached:  # the estimate is derived again: its rules may have changed
                cached.update(estimate(cached, self.chip, cached, margin=self.margin))
            return {**cached, "cached": True}
        t0 = time.perf_counter()
        try:
            lowered, info = lower_program(program, config, self.devices)
            compiled = lowered.compile()
        except PlanError:
            raise
        except ValueError as e:  # the config cannot run on this slice (batch divisibility, ...)
            return {"program": program, "error": str(e), "fits": False}
        except Exception as e:  # the compiler gave up (e.g. a program far beyond the chip's memory)
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            if "RESOURCE_EXHAUSTED" not in msg and "memory" not in msg.lower():
                raise
            result = {"program": program, "error": f"compiler: {msg[:300]}", "fits": False,
                      "compile_seconds": time.perf_counter() - t0, **_exhausted_numbers(msg)}
            self._store(path, result)
            return result
        self.compiles += 1
        result = {"program": program, **analyse(compiled, self.chip, info, margin=self.margin),
                  "compile_seconds": time.perf_counter() - t0}
        self._store(path, result)
        return result

    def _store(self, path, result):
        if path:
            os.makedirs(self.cache_dir, exist_ok=True)
            tmp = f"{path}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(result, f, indent=1)
            os.replace(tmp, path)

    # ---------------------------------------------------------------- search
    def search(self, config, base: Layout, base_train: dict, budget: int) -> list[tuple[Layout, dict]]:
        """At most ``budget`` more compiles of the train step; returns every (layout, result)
        tried, the base first."""
        tried = [(base, base_train)]
        seen = {base}

        def attempt(layout: Layout) -> dict | None:
            nonlocal budget
            if layout in seen or budget <= 0:
                return None
            seen.add(layout)
            budget -= 1
            self.log(f"  trying {layout.describe(self.n_chips)} ...")
            r = self.measure("train", layout.apply(config))
            tried.append((layout, r))
            self.log(f"    {_short(r)}")
            return r

        if not base_train["fits"]:
            # memory first: each step keeps the previous ones
            layout = base
            steps = [lambda l: dataclasses.replace(l, data=1, fsdp=self.n_chips),
                     lambda l: dataclasses.replace(l, remat="save_matmuls"),
                     lambda l: dataclasses.replace(l, remat="full")]
            steps += [lambda l, k=k: dataclasses.replace(l, grad_accum=k) for k in (2, 4, 8, 16)]
            steps += [lambda l: dataclasses.replace(l, param_dtype="bfloat16")]
            for step in steps:
                nxt = step(layout)
                if nxt.batch_size % (nxt.grad_accum * self.n_chips) and nxt.grad_accum > 1:
                    continue  # micro-batches would not split over the chips
                r = attempt(nxt)
                if r is None and budget <= 0:
                    break
                layout = nxt
                if r is not None and r.get("fits"):
                    break
        else:
            # speed: the other data/FSDP split, then a larger per-chip batch while it fits
            f = 1 if base.fsdp == self.n_chips else self.n_chips  # all chips on fsdp, or on data
            attempt(dataclasses.replace(base, data=self.n_chips // f, fsdp=f))
            layout = base
            while budget > 0:
                nxt = dataclasses.replace(layout, batch_size=layout.batch_size * 2)
                r = attempt(nxt)
                if r is None or not r.get("fits"):
                    break
                layout = nxt
        return tried


def _exhausted_numbers(msg: str) -> dict:
    """What the TPU compiler says it needed when it ran out of HBM, e.g. "the total memory
    required for HLO temporaries (15.96G) exceeds available HBM (15.75G)" (G = GiB)."""
    m = re.search(r"\(([\d.]+)([GMK])\) exceeds available HBM \(([\d.]+)([GMK])\)", msg)
    if not m:
        return {}
    unit = {"G": GiB, "M": 2 ** 20, "K": 2 ** 10}
    return {"required_temp_bytes": int(float(m.group(1)) * unit[m.group(2)]),
            "compiler_available_bytes": int(float(m.group(3)) * unit[m.group(4)])}


def _short(r: dict) -> str:
    if "error" in r:
        return f"does not build: {r['error']}"
    return (f"peak {r['peak_bytes'] / GiB:.2f} GiB of {r['hbm_bytes'] / GiB:.0f} GiB "
            f"({'fits' if r['fits'] else 'DOES NOT FIT'}), {r['flops'] / 1e12:.2f} TFLOP, "
            f"~{r['predicted_seconds'] * 1e3:.1f} ms ({r['bound']}-bound)"
            + (f", MFU ~{r['predicted_mfu']:.0%}" if r.get("predicted_mfu") else "")
            + (", cached" if r.get("cached") else f", compiled in {r['compile_seconds']:.0f} s"))


TIE = 0.02  # estimates within 2 % of the best count as equal: the estimate is no finer than that


def _best(tried: list[tuple[Layout, dict]]) -> tuple[Layout, dict] | None:
    """The fastest layout that fits; among those within ``TIE`` of it, the first tried (the
    config as given comes first, then fewer changes), so a layout is changed only for a gain."""
    fitting = [(l, r) for l, r in tried if r.get("fits") and r.get("predicted_examples_per_s_per_chip")]
    if not fitting:
        return None
    top = max(r["predicted_examples_per_s_per_chip"] for _, r in fitting)
    return next((l, r) for l, r in fitting if r["predicted_examples_per_s_per_chip"] >= (1 - TIE) * top)


def plan(config, topology: str, *, programs=PROGRAMS, search: int = 4, cache_dir: str | None = None,
         margin: float = 0.0, log: Callable[[str], None] = print) -> dict:
    """Plans ``config`` on ``topology``: every program as configured, a layout search over the
    train step, the recommended layout's other programs. Returns a JSON-able report."""
    for p in programs:
        if p not in PROGRAMS:
            raise PlanError(f"Unknown program {p!r}; choose from {PROGRAMS}.")
    planner = Planner(topology, cache_dir=cache_dir, margin=margin, log=log)
    chip = planner.chip
    log(f"Planning for {planner.topology}: {planner.n_chips} x {planner.devices[0].device_kind} "
        f"({chip.hbm_bytes / GiB:.0f} GiB HBM, {chip.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16 per chip).")
    try:
        base = Layout.of(config, planner.n_chips)
    except ValueError as e:
        raise PlanError(str(e)) from e
    report: dict[str, Any] = {"topology": planner.topology, "chips": planner.n_chips,
                              "device_kind": planner.devices[0].device_kind, "chip": dataclasses.asdict(chip),
                              "margin": margin, "given": {"layout": dataclasses.asdict(base), "programs": {}}}
    for p in programs:
        log(f"{p}: {base.describe(planner.n_chips)} ...")
        r = planner.measure(p, config)
        report["given"]["programs"][p] = r
        log(f"  {_short(r)}")
    given_fits = all(r.get("fits") for r in report["given"]["programs"].values())
    report["fits"] = given_fits
    rec = None
    if "train" in programs and search > 0:
        log(f"Layout search over the train step (at most {search} more compiles):")
        tried = planner.search(config, base, report["given"]["programs"]["train"], search)
        report["tried"] = [{"layout": dataclasses.asdict(l), **r} for l, r in tried]
        best = _best(tried)
        if best is not None:
            layout, train_r = best
            rec = {"layout": dataclasses.asdict(layout), "overrides": layout.overrides(base),
                   "description": layout.describe(planner.n_chips), "programs": {"train": train_r}}
            if layout != base:
                for p in programs:
                    if p != "train":
                        rec["programs"][p] = planner.measure(p, layout.apply(config))
            else:
                rec["programs"] = report["given"]["programs"]
            rec["fits"] = all(r.get("fits") for r in rec["programs"].values())
            rec["changes_global_batch"] = layout.batch_size != base.batch_size
    report["recommended"] = rec
    report["compiles"] = planner.compiles
    return report


def format_report(report: dict) -> str:
    n = report["chips"]
    lines = [f"\n== Plan for {report['topology']} ({n} chips, {report['device_kind']}) =="]
    header = ("program", "fits", "peak GiB", "args GiB", "out GiB", "temp GiB", "headroom GiB", "TFLOP/call",
              "est. ms", "bound", "ex/s/chip", "est. MFU", "compile s")
    lines.append(" | ".join(header))

    def row(name, r):
        if "error" in r:
            return f"{name} | no | {r['error']}"
        g = lambda b: f"{b / GiB:.2f}"  # noqa: E731
        return " | ".join([name, "yes" if r["fits"] else "NO", g(r["peak_bytes"]), g(r["argument_bytes"]),
                           g(r["output_bytes"]), g(r["temp_bytes"]), g(r["headroom_bytes"]),
                           f"{r['flops'] / 1e12:.3f}", f"{r['predicted_seconds'] * 1e3:.1f}", r["bound"],
                           f"{r['predicted_examples_per_s_per_chip']:.2f}" if r.get(
                               "predicted_examples_per_s_per_chip") else "-",
                           f"{r['predicted_mfu']:.0%}" if r.get("predicted_mfu") else "-",
                           "cached" if r.get("cached") else f"{r.get('compile_seconds', 0):.0f}"])

    given = report["given"]
    lines.append(f"-- as configured: {Layout(**given['layout']).describe(n)}")
    lines += [row(p, r) for p, r in given["programs"].items()]
    rec = report.get("recommended")
    if rec is not None:
        lines.append(f"-- recommended: {rec['description']}" + ("" if rec["overrides"] else " (as configured)"))
        if rec["overrides"]:
            lines += [row(p, r) for p, r in rec["programs"].items()]
            lines.append("   overrides: " + " ".join(rec["overrides"]))
            if rec.get("changes_global_batch"):
                lines.append("   (changes the global batch: the optimisation changes too; adjust optim.lr)")
    elif report.get("tried") is not None:
        lines.append("-- no layout tried fits; raise --search or use a larger slice.")
    programs = (rec or given)["programs"]
    if any(not programs[p].get("fits") for p in ("eval", "sample") if p in programs):
        lines.append("   eval/sample do not fit at the training batch: evaluate with a smaller global batch "
                     "(eval.py --batch_size, upsample --batch_size) or tile the autoencoder "
                     "(--config.first_stage.tile_size=32).")
    lines.append("Times are roofline estimates (max of compute, HBM and ICI time at the chip's published peaks), "
                 "not measurements; memory is the TPU compiler's own.")
    lines.append("FITS" if report["fits"] else "DOES NOT FIT as configured")
    return "\n".join(lines)


def default_cache_dir() -> str:
    return os.environ.get("CFM_JAX_PLAN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "cfm_jax", "plan")


PROG = "python -m cfm_jax.plan"
_REQUIRED = {"topology": "a TPU topology or accelerator type, e.g. v5e:4x4 or v4-32"}


def define_flags(fl: flags.FlagValues, argv: Sequence[str]) -> None:
    """The command line's flags, on ``fl`` (a fresh ``FlagValues`` per :func:`main` call); the
    ``--config.*`` overrides are read from ``argv``, not the process's ``sys.argv``."""
    config_flags.DEFINE_config_file("config", "configs/flow400_64-128/unet_base_psu.py",
                                    "Config file (ml_collections), with --config.section.key=value overrides.",
                                    lock_config=True, flag_values=fl, sys_argv=list(argv))
    flags.DEFINE_list("topology", None, "TPU topologies or accelerator types, e.g. v5e:4x4, v4-32, "
                      "v5litepod-16, v5p-8 (comma-separated: one plan each; required).", flag_values=fl)
    flags.DEFINE_list("programs", list(PROGRAMS), f"Programs to compile, from {PROGRAMS}.", flag_values=fl)
    flags.DEFINE_integer("search", 4, "At most this many more compiles of the train step for the layout "
                         "search (0: only the config as given).", flag_values=fl)
    flags.DEFINE_float("margin", 0.0, "Fraction of HBM to keep free (fits = peak <= (1 - margin) * HBM).",
                       flag_values=fl)
    flags.DEFINE_string("cache_dir", None, "Result cache (default $CFM_JAX_PLAN_CACHE or "
                        "~/.cache/cfm_jax/plan).", flag_values=fl)
    flags.DEFINE_bool("no_cache", False, "Compile everything again.", flag_values=fl)
    flags.DEFINE_string("json", None, "Write the full report (a list, one per topology) here.", flag_values=fl)


def parse(argv: Sequence[str]) -> tuple[flags.FlagValues, Any]:
    """The flags of ``argv`` (``argv[0]`` the program) and the config with its overrides: a bad
    flag, value, config file or override is one line and exit code 2."""
    fl = flags.FlagValues()
    try:  # a --config.* override of no key raises where the config is loaded: the define, parse or first use
        define_flags(fl, argv)
        rest = cli.parse_flags(fl, argv, prog=PROG, usage="--topology T[,T...] [--config FILE] [flags]",
                               doc=__doc__.split("\n\n")[0],
                               epilog=f"Exit status: 0 fits, {EXIT_DOES_NOT_FIT} does not fit, 2 usage error. "
                                      "See the module docstring (python -c 'import cfm_jax.plan as p; "
                                      "print(p.__doc__)') for the programs, the estimates and the search.")
        cli.reject_positional(rest, PROG, "; give several topologies as --topology a,b")
        cli.require_flags(fl, _REQUIRED, PROG)
        if not 0.0 <= fl.margin < 1.0:
            cli.fail(f"--margin={fl.margin}: it is the fraction of HBM to keep free and must be in [0, 1).")
        config = fl.config
        config.keys()  # a config file that failed to load raises on first use: here
    except (KeyError, AttributeError, OSError) as e:
        message = cli.config_error(e, argv)
        if message is None:
            raise
        cli.fail(message)
    except ValueError as e:  # a config file's own checks, an override of the wrong type
        cli.fail(cli.one_line(e))
    return fl, config


def _cpu_only() -> None:
    """The plan compiles for TPU topologies from descriptions and needs no local accelerator: JAX
    stays on the CPU (on a TPU VM it must not grab the chips, which
    :func:`cli.skip_tpu_probe_without_accelerator` would leave to it) unless the user chose
    platforms; JAX, imported already, read the variable at import, hence the config update too.
    Compile-only programs cannot go into the persistent compilation cache: it is off."""
    if "JAX_PLATFORMS" not in os.environ:
        os.environ["JAX_PLATFORMS"] = "cpu"
        jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_enable_compilation_cache", False)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cfm_jax.plan``: plans a config (with ``--config.*`` overrides) on topologies.
    ``argv[0]`` the program (default ``sys.argv``); returns the exit code."""
    fl, config = parse(list(sys.argv if argv is None else argv))
    _cpu_only()  # before JAX makes a backend
    cache_dir = None if fl.no_cache else (fl.cache_dir or default_cache_dir())
    reports = []
    status = 0
    for t in fl.topology:
        try:
            report = plan(config, t, programs=fl.programs, search=fl.search, cache_dir=cache_dir,
                          margin=fl.margin, log=lambda s: print(s, flush=True))
        except PlanError as e:
            cli.fail(str(e))
        print(format_report(report), flush=True)
        reports.append(report)
        if not report["fits"]:
            status = EXIT_DOES_NOT_FIT
    if fl.json:
        os.makedirs(os.path.dirname(os.path.abspath(fl.json)), exist_ok=True)
        with open(fl.json, "w") as f:
            json.dump(reports, f, indent=1, default=str)
    return status


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["CHIPS", "ChipSpec", "EXIT_DOES_NOT_FIT", "Layout", "PROGRAMS", "PlanError", "Planner", "analyse",
           "collective_bytes", "format_report", "lower_program", "plan", "topology_name", "tpu_devices"]
