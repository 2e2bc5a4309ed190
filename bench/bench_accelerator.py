"""Benchmark: the paper configuration on one accelerator (written for an NVIDIA H200).

    bash bench/run_h200.sh                              # the GPU machine: Python, XLA flags, this script
    python bench/bench_accelerator.py --budget_s 450 --profile_dir runs/profile
    python bench/bench_accelerator.py --small --memory_limit_gib 0.01 --peak_tflops 1   # CPU check

Prints one JSON object per line (and appends it to ``--out_jsonl``), one per section, in the
order below; a section that would not fit the remaining ``--budget_s`` prints
``{"bench": ..., "skipped": "budget"}`` instead, and a section that fails prints its error, so a
run cut short still reports what it measured:

* ``accelerator_env``: device kind and count, jax version, XLA_FLAGS, the device's memory
  limit (``memory_stats()['bytes_limit']``) and the bf16 dense peak used for the MFU.
* ``train_batch_search``: the paper train step (305.8 M-parameter UNet, bf16 compute, fp32
  params, Adam, EMA; 128² x 4 latents; a synthetic batch, as ``bench/bench_train.py``) is
  compiled ahead of time (``lower(...).compile()`` on abstract inputs: nothing allocated) at
  per-device batch sizes from ``--train_batches``. A batch fits when XLA's
  ``memory_analysis()`` (arguments + outputs + temporaries - aliased) is at most
  ``--memory_margin`` x the device's limit. A compile of the paper step takes minutes, so the
  search compiles few: it starts at the largest candidate that a prior puts under the limit
  (train state + gradients + ``--prior_factor`` x the activations ``jax.vjp`` keeps per
  example, traced with ``jax.eval_shape``: 1.30 GiB at 128²), then predicts the next
  candidates' memory from the compiled points (linear in the batch) and compiles only those
  predicted to fit (within 5 %), backing off below a batch that did not fit. A candidate
  predicted not to fit is reported (``"source": "predicted"``), not compiled; a compile that
  fails with an out-of-memory error counts as "does not fit"; any other compile error ends
  the search (reported, not raised).
* ``train_step``: the largest fitting batch, run: median step time over ``--steps`` steps
  after two warm-up steps (``block_until_ready``), examples/s, model TFLOP/s per device from
  ``cfm_jax/flops.py`` (``train_flops_per_example``: forward + backward = 3 x forward, padding
  and elementwise work excluded), MFU = model FLOP/s / the chip's bf16 dense peak
  (``PEAK_BF16_TFLOPS`` by ``device_kind``, or ``--peak_tflops``), and XLA's
  ``cost_analysis()['flops']`` of the compiled step beside it (it also counts the elementwise
  work, the optimizer and the EMA).
* ``train_profile`` (with ``--profile_dir``): a ``jax.profiler`` trace of ``--profile_steps``
  steps of the compiled step (TensorBoard's profile plugin or Perfetto): convolutions,
  attention, layout transposes, GroupNorm fusions, the optimizer.
* ``train_breakdown``: the UNet forward alone at the same batch, the forward without the
  level attention blocks (``attention_resolutions=()``; the middle block keeps its attention),
  and the optimizer + EMA update alone; backward = train step - forward - optimizer. Each
  piece's model TFLOP/s says where the MFU is lost.
* ``upsample``: the 1024² inference of ``bench/bench_upsample.py`` (PSU + 40-NFE Euler flow +
  VAE decode, random weights; its flags ``--batches``, ``--num_steps``, ``--vae_dtype``, ...
  apply), seconds per image at batch 1 and 4.
* ``summary``: the headline numbers and the wall time.

**The rematerialisation warning.** XLA's GPU compiler prints "Can't reduce memory use below X
by rematerialization; only reduced to Y" when a program's live memory, estimated on its
schedule, exceeds the limit of its ``HloRematerialization`` pass (a fraction of the device
memory); such a program is either recomputed by XLA (FLOPs the model count does not see) or
fails when it runs. This script therefore compiles only batches predicted to fit, never runs
one whose ``memory_analysis`` exceeds the limit, and reports an out-of-memory compile as "does
not fit"; if the warning still appears in its log, it belongs to the compile of the search row
marked ``"fits": false`` (a prediction that was too low), and that program is not run. The
limit's arithmetic and the earlier H200 run that printed the warning: docs/accelerator.md,
"The rematerialisation warning of the last H200 run".
"""
import gc
import json
import math
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402

from bench import bench_upsample  # noqa: E402  (its flags --small, --batches, --num_steps, ... are shared)
from bench.timing import timed  # noqa: E402
from cfm_jax import flops as flops_lib, sharding  # noqa: E402
from cfm_jax.ema import EMAConfig, ema_update  # noqa: E402
from cfm_jax.first_stage import IdentityFirstStage  # noqa: E402
from cfm_jax.model import CFMUpsampler  # noqa: E402
from cfm_jax.models.unet import count_params  # noqa: E402
from cfm_jax.optim import make_optimizer  # noqa: E402
from cfm_jax.solvers import SolverSpec  # noqa: E402
from cfm_jax.trainer import abstract_train_state, create_train_state, make_train_step  # noqa: E402
from configs import load_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_CONFIG = os.path.join(ROOT, "configs/flow400_64-128/unet_base_psu.py")
GIB = 2 ** 30

# bf16 dense (no sparsity) peak TFLOP/s per chip, matched as a substring of jax's
# `device_kind`, first match wins (so "H100 PCIe" precedes "H100"). Vendor data sheets.
PEAK_BF16_TFLOPS = (
    ("H200 NVL", 835.0),
    ("H200", 989.0),       # H200 SXM; GH200 (an H100-class GPU) has the same peak
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),       # H100 SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
    ("L40S", 362.0),
    ("TPU v6 lite", 918.0),
    ("TPU v5 lite", 197.0),
    ("TPU v5", 459.0),     # v5p
    ("TPU v4", 275.0),
)

# Shared with bench_upsample.py (one flag namespace): --small (here also: the tiny UNet in the train
# sections, 8² latents, batches 1-8, few steps), --batches / --num_steps / --method / --repeats /
# --lowres_latent / --vae_dtype of the inference section; --repeats also for the breakdown's pieces.
_SMALL = bench_upsample._SMALL
_TRAIN_BATCHES = flags.DEFINE_list("train_batches", None, "Per-device batch sizes to try (default "
                                   "16,32,64,128,256; small: 1,2,4,8).")
_LATENT = flags.DEFINE_integer("latent_size", None, "High-res latent side (default 128; small: 16).")
_STEPS = flags.DEFINE_integer("steps", None, "Timed train steps (default 10; small: 2).")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "bf16 dense peak TFLOP/s per device for the MFU "
                           "(0: from PEAK_BF16_TFLOPS by device_kind).")
_MEM_LIMIT = flags.DEFINE_float("memory_limit_gib", 0.0, "Device memory limit in GiB (0: the device's "
                                "memory_stats()['bytes_limit']; on a CPU half the RAM).")
_PRIOR = flags.DEFINE_float("prior_factor", 1.6, "The search starts at the largest batch whose memory, estimated as "
                            "train state + gradients + this factor x the vjp residuals per example, fits; 1.6 fits "
                            "an H200 compile log (docs/accelerator.md). 0: start at the smallest batch.")
_MARGIN = flags.DEFINE_float("memory_margin", 0.95, "A batch fits when XLA's memory estimate is at most this "
                             "fraction of the limit (room for cuDNN workspaces and fragmentation).")
_BUDGET = flags.DEFINE_float("budget_s", None, "Wall-clock budget in seconds; sections that would not fit are "
                             "skipped (default 450; small: 300).")
_PROFILE_DIR = flags.DEFINE_string("profile_dir", "", "If set, write a jax.profiler trace of a few train steps here.")
_PROFILE_STEPS = flags.DEFINE_integer("profile_steps", 3, "Train steps in the profile.")
_UPSAMPLE = flags.DEFINE_bool("upsample", True, "Run the 1024² inference section (bench_upsample's --batches, "
                               "default 1,4; small: 1 unless --batches is given; --num_steps, default 41 = 40 NFE; "
                               "small: 3 unless given).")
_BREAKDOWN = flags.DEFINE_bool("breakdown", True, "Time the forward alone, without level attention, and the "
                               "optimizer + EMA.")
_OUT = flags.DEFINE_string("out_jsonl", "", "Also append every JSON line to this file.")


# --------------------------------------------------------------------------- small helpers
def peak_tflops(device_kind: str, override: float = 0.0) -> tuple[float | None, str]:
    """``(peak bf16 dense TFLOP/s, where it came from)``; ``(None, 'unknown')`` if not in the table."""
    if override > 0:
        return float(override), "--peak_tflops"
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in device_kind.lower():
            return value, f"table: {key}"
    return None, "unknown"


def mfu(flops_per_step: float, step_seconds: float, peak: float | None) -> float | None:
    """Model FLOP utilisation: ``flops / (seconds * peak TFLOP/s * 1e12)`` (per device)."""
    if not peak or step_seconds <= 0:
        return None
    return flops_per_step / (step_seconds * peak * 1e12)


def memory_estimate(compiled) -> dict | None:
    """XLA's memory analysis of a compiled program, and its device footprint
    ``total = arguments + outputs + temporaries - aliased`` (donated inputs reused as outputs)."""
    try:
        m = compiled.memory_analysis()
        out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias")}
    except Exception:  # not every backend reports it
        return None
    out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


def xla_flops(compiled) -> float | None:
    """``cost_analysis()['flops']`` of a compiled program (per device), if the backend says."""
    try:
        cost = compiled.cost_analysis()
        if isinstance(cost, (list, tuple)):
            cost = cost[0]
        value = float(cost.get("flops", float("nan")))
        return value if math.isfinite(value) and value > 0 else None
    except Exception:
        return None


def is_out_of_memory(error: BaseException) -> bool:
    text = str(error)
    return any(s in text for s in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OOM"))


def predict_memory(points: list[tuple[int, int]], batch: int, fixed_bytes: int) -> int | None:
    """Memory of ``batch`` from compiled ``(batch, bytes)`` points: a line through the two
    largest batches, or with one point ``fixed + (m1 - fixed) * batch / b1`` (the train state
    does not grow with the batch, everything else about linearly)."""
    pts = sorted(set(points))
    if not pts:
        return None
    if len(pts) == 1:
        b1, m1 = pts[0]
        return int(fixed_bytes + (m1 - fixed_bytes) * batch / b1)
    (b1, m1), (b2, m2) = pts[-2], pts[-1]
    slope = (m2 - m1) / (b2 - b1)
    return int(m2 + slope * (batch - b2))


def residual_bytes_per_example(up, size: int, abstract_params) -> int:
    """Bytes per example of the residuals ``jax.vjp`` of the training loss keeps for the
    backward pass (traced with ``jax.eval_shape`` at batch 1 and 2: no compile, no memory)."""
    def residual_bytes(b):
        batch = {k: jax.ShapeDtypeStruct((b, size, size, up.first_stage.latent_channels), jnp.float32)
                 for k in ("latent", "latent_lowres")}

        def vjp_fn(params, batch):
            return jax.vjp(lambda p: jnp.mean(up.loss(p, batch, jax.random.PRNGKey(0))), params)[1]
        return sum(math.prod(x.shape) * x.dtype.itemsize
                   for x in jax.tree.leaves(jax.eval_shape(vjp_fn, abstract_params, batch)))

    return max(residual_bytes(2) - residual_bytes(1), 1)


class Budget:
    """Seconds left of the wall-clock budget."""

    def __init__(self, seconds: float, clock=time.monotonic):
        self.clock = clock
        self.deadline = clock() + seconds

    def left(self) -> float:
        return self.deadline - self.clock()


def search_batch(compile_fn, candidates, limit_bytes: int, *, fixed_bytes: int = 0, budget: Budget | None = None,
                 confirm: float = 1.05, start: int | None = None):
    """The largest per-device batch of ``candidates`` whose program fits ``limit_bytes``.

    ``compile_fn(batch) -> (compiled, memory_bytes)``. Returns ``(best_batch, best_compiled,
    rows, stop_reason)``; ``best_batch`` is None when nothing fits. Candidates are visited
    upwards: ``start`` (default the smallest) first, then the largest one whose predicted memory
    (:func:`predict_memory`) is at most ``confirm`` x the limit (slightly over the limit is
    compiled, to settle the boundary by measurement); after a batch that does not fit, the
    largest such one between it and the last fit. A batch fits when its *compiled* memory is
    at most the limit. Stops when no untried candidate above the best fit remains
    (``candidates``), when the next one is predicted not to fit (``memory (predicted)``, a row
    with ``"source": "predicted"``, not compiled) or measured not to fit with no untried
    candidate below it (``memory``), on a compile error other than out of memory (``compile
    error``), or when the next compile would not fit the budget (``budget``; the longest
    compile so far is the estimate).
    """
    clock = budget.clock if budget is not None else time.perf_counter
    todo = sorted({int(b) for b in candidates})
    rows, points = [], []
    best, best_compiled, ceiling = None, None, None  # ceiling: smallest batch known not to fit
    longest_compile = 0.0
    while True:
        open_ = [b for b in todo if (best is None or b > best) and (ceiling is None or b < ceiling)
                 and not any(r["per_device_batch"] == b for r in rows)]
        if not open_:
            return best, best_compiled, rows, ("memory" if ceiling is not None else "candidates")
        if not points:
            nxt = start if start in open_ else open_[0]
        else:
            fitting = [b for b in open_ if predict_memory(points, b, fixed_bytes) <= confirm * limit_bytes]
            if not fitting:
                b = open_[0]
                pred = predict_memory(points, b, fixed_bytes)
                rows.append({"per_device_batch": b, "fits": False, "source": "predicted",
                             "memory_bytes": pred, "memory_gib": round(pred / GIB, 3)})
                return best, best_compiled, rows, "memory (predicted)"
            nxt = fitting[-1]
        if budget is not None and rows and budget.left() < 1.2 * longest_compile:
            return best, best_compiled, rows, "budget"
        t0 = clock()
        try:
            compiled, mem = compile_fn(nxt)
        except Exception as e:  # noqa: BLE001 - reported, never raised
            seconds = clock() - t0
            longest_compile = max(longest_compile, seconds)
            if is_out_of_memory(e):
                rows.append({"per_device_batch": nxt, "fits": False, "source": "compile: out of memory",
                             "compile_s": round(seconds, 2), "error": str(e)[:300]})
                ceiling = nxt
                continue
            rows.append({"per_device_batch": nxt, "fits": False, "source": "compile error",
                         "compile_s": round(seconds, 2), "error": f"{type(e).__name__}: {str(e)[:500]}"})
            return best, best_compiled, rows, "compile error"
        seconds = clock() - t0
        longest_compile = max(longest_compile, seconds)
        fits = mem is not None and mem <= limit_bytes
        row = {"per_device_batch": nxt, "fits": fits, "source": "compiled", "compile_s": round(seconds, 2),
               "memory_bytes": mem, "memory_gib": None if mem is None else round(mem / GIB, 3)}
        if points:
            row["predicted_bytes"] = predict_memory(points, nxt, fixed_bytes)
        rows.append(row)
        if mem is not None:
            points.append((nxt, mem))
        if fits:
            best, best_compiled = nxt, compiled
        else:
            ceiling = nxt
            del compiled


# --------------------------------------------------------------------------- the benchmark
class Reporter:
    """Prints each result as one JSON line (and appends it to a file), flushed at once."""

    def __init__(self, path: str = ""):
        self.path = path
        self.rows = []

    def __call__(self, row: dict) -> dict:
        line = json.dumps(row)
        print(line, flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(line + "\n")
        self.rows.append(row)
        return row


def paper_config(small: bool, latent_size: int):
    """The paper's config (a tiny UNet with ``small``) for ``latent_size``² latents."""
    config = load_config(PAPER_CONFIG)
    if small:
        # one level, one res block, attention at full resolution: every kind of block, compiled fast
        config.model.update(model_channels=32, channel_mult=(1,), num_res_blocks=1, attention_resolutions=(1,),
                            num_heads=1, dim_head=16)
    config.data.update(image_size=8 * latent_size)
    return config


def device_memory_limit(override_gib: float) -> tuple[int, str]:
    if override_gib > 0:
        return int(override_gib * GIB), "--memory_limit_gib"
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), "memory_stats()['bytes_limit']"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(ram // 2), "half the host RAM (no device memory_stats)"


def train_section(config, size, candidates, limit, report, budget, steps, peak, profile_dir, profile_steps):
    """Batch search, then the timed train step at the largest fitting batch. Returns the
    pieces the breakdown reuses (or None when nothing fits)."""
    # Latent records carry latent_lowres on the high-res grid: the loss never calls the first
    # stage, so a shape-only stand-in serves (as in bench_train.py).
    fs = IdentityFirstStage(latent_channels=config.model.out_channels, downsample_factor=8,
                            scale_factor=config.first_stage.scale_factor, name="shape-stand-in")
    up = CFMUpsampler(config, first_stage=fs)
    mesh = sharding.make_data_mesh()
    n_dev = mesh.devices.size
    c = fs.latent_channels
    tx, schedule = make_optimizer(config.optim)
    ema_cfg = EMAConfig.from_config(config.ema)
    train_step = make_train_step(up, tx, schedule, ema_cfg, mesh, grad_accum_steps=1)
    abstract_state = abstract_train_state(up, tx, size, mesh)
    state_bytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(abstract_state))
    grad_bytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(abstract_state.params))
    batch_sh = sharding.batch_sharding(mesh)

    def abstract_batch(per_device):
        shape = (per_device * n_dev, size, size, c)
        return {k: jax.ShapeDtypeStruct(shape, np.float32, sharding=batch_sh) for k in ("latent", "latent_lowres")}

    # Where to start: a prior from the activations jax.vjp keeps for the backward pass (shapes
    # only, seconds), times --prior_factor for XLA's layouts and copies; the largest candidate
    # it puts under the limit is compiled first, so the paper step is compiled once or twice.
    prior = None
    if _PRIOR.value > 0:
        try:
            prior = residual_bytes_per_example(up, size, abstract_state.params)
        except Exception as e:  # noqa: BLE001 - only a starting point: fall back to the smallest batch
            print(f"prior failed ({type(e).__name__}: {e}); starting at the smallest batch", file=sys.stderr)
    start = None
    if prior:
        under = [b for b in sorted(candidates) if state_bytes + grad_bytes + _PRIOR.value * prior * b <= limit]
        start = under[-1] if under else None

    def compile_at(per_device):
        compiled = train_step.lower(abstract_state, abstract_batch(per_device)).compile()
        est = memory_estimate(compiled)
        return compiled, None if est is None else est["total"]

    # what does not grow with the batch: the train state and one set of gradients
    best, compiled, rows, reason = search_batch(compile_at, candidates, limit, fixed_bytes=state_bytes + grad_bytes,
                                                budget=budget, start=start)
    for r in rows:
        r["global_batch"] = r["per_device_batch"] * n_dev
    report({"bench": "train_batch_search", "latent_size": size, "candidates": sorted(candidates),
            "memory_limit_bytes": limit, "memory_limit_gib": round(limit / GIB, 3),
            "train_state_bytes": state_bytes, "prior_bytes_per_example": prior, "prior_factor": _PRIOR.value,
            "start_batch": start, "rows": rows, "chosen_per_device_batch": best,
            "stop_reason": reason})
    if best is None:
        return None

    global_batch = best * n_dev
    rng = np.random.default_rng(0)
    host = {k: rng.standard_normal((global_batch, size, size, c), np.float32) for k in ("latent", "latent_lowres")}
    batch = sharding.shard_batch(host, mesh)
    state = create_train_state(up, tx, jax.random.PRNGKey(0), size, mesh)
    losses = []

    def step():
        nonlocal state
        state, metrics = compiled(state, batch)
        losses.append(float(jax.block_until_ready(metrics)["loss"]))

    for _ in range(2):  # warm-up (the second also runs with the EMA past its first copy)
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    est = memory_estimate(compiled)
    model_flops_example = flops_lib.train_flops_per_example(config.model, size)
    model_flops_step = model_flops_example * best  # per device
    xf = xla_flops(compiled)
    compile_row = next(r for r in rows if r["per_device_batch"] == best)
    row = report({
        "bench": "train_step", "config": os.path.relpath(PAPER_CONFIG, ROOT), "small": _SMALL.value,
        "params": count_params(up.model, (size, size)), "compute_dtype": config.model.dtype,
        "param_dtype": config.model.param_dtype, "latent_size": size, "latent_channels": c,
        "per_device_batch": best, "global_batch": global_batch, "num_devices": n_dev,
        "compile_s": compile_row.get("compile_s"), "step_s": step_s, "step_s_min": min(times),
        "step_s_all": [round(t, 6) for t in times], "timed_steps": steps,
        "examples_per_s": global_batch / step_s, "examples_per_s_per_device": best / step_s,
        "model_flops_per_example": model_flops_example, "model_flops_per_step_per_device": model_flops_step,
        "model_tflops_per_s_per_device": model_flops_step / step_s / 1e12,
        "peak_tflops": peak, "mfu": mfu(model_flops_step, step_s, peak),
        "xla_flops_per_step_per_device": xf,
        "xla_tflops_per_s_per_device": None if xf is None else xf / step_s / 1e12,
        "xla_flops_over_model_flops": None if xf is None else xf / model_flops_step,
        "memory": est, "loss_finite": bool(all(math.isfinite(v) for v in losses))})

    if profile_dir:
        try:
            os.makedirs(profile_dir, exist_ok=True)
            jax.profiler.start_trace(profile_dir)
            try:
                for _ in range(profile_steps):
                    with jax.profiler.StepTraceAnnotation("train", step_num=int(state.step)):
                        step()
            finally:
                jax.profiler.stop_trace()
            files = sorted(os.path.relpath(os.path.join(d, f), profile_dir)
                           for d, _, fs_ in os.walk(profile_dir) for f in fs_)
            report({"bench": "train_profile", "profile_dir": profile_dir, "steps": profile_steps, "files": files})
        except Exception as e:  # noqa: BLE001 - a missing profiler backend must not lose the numbers
            report({"bench": "train_profile", "profile_dir": profile_dir, "error": f"{type(e).__name__}: {e}"[:500]})

    return {"up": up, "tx": tx, "ema_cfg": ema_cfg, "state": state, "batch": batch, "per_device_batch": best,
            "step_s": step_s, "compile_s": compile_row.get("compile_s") or 0.0, "train_row": row}


def breakdown_section(config, size, pieces, peak, report, repeats):
    """Forward alone, forward without the level attention blocks, optimizer + EMA alone."""
    up, state, batch = pieces["up"], pieces["state"], pieces["batch"]
    b = pieces["per_device_batch"]
    x1, lowres = up.scaled_latents(batch)
    t = jnp.full((x1.shape[0],), 0.5, jnp.float32)

    def forward(upsampler):
        return lambda p, x, tt, ctx: upsampler.velocity(p, x, tt, ctx, train=True)

    _, c_fwd, t_fwd, m_fwd = timed(forward(up), state.params, x1, t, lowres, repeats=repeats)
    fwd_flops = flops_lib.unet_forward_flops(config.model, size, b)

    no_attn_cfg = config.copy_and_resolve_references()
    no_attn_cfg.model.attention_resolutions = ()
    up_na = CFMUpsampler(no_attn_cfg, first_stage=up.first_stage)
    params_na = jax.jit(lambda k: up_na.init(k, size))(jax.random.PRNGKey(3))
    _, c_na, t_na, _ = timed(forward(up_na), params_na, x1, t, lowres, repeats=repeats)
    na_flops = flops_lib.unet_forward_flops(no_attn_cfg.model, size, b)
    del params_na

    tx, ema_cfg = pieces["tx"], pieces["ema_cfg"]

    def optimizer_and_ema(params, opt_state, ema_params, step, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        return new_params, opt_state, ema_update(ema_params, params, step, ema_cfg)

    _, c_opt, t_opt, _ = timed(optimizer_and_ema, state.params, state.opt_state, state.ema_params, state.step,
                               state.params, repeats=repeats)
    step_s = pieces["step_s"]
    n_dev = jax.device_count()
    backward = step_s - t_fwd - t_opt
    report({
        "bench": "train_breakdown", "per_device_batch": b, "latent_size": size,
        "train_step_s": step_s, "forward_s": t_fwd, "forward_no_level_attention_s": t_na,
        "level_attention_s": t_fwd - t_na, "optimizer_and_ema_s": t_opt,
        "backward_s_estimate": backward, "backward_over_forward": backward / t_fwd if t_fwd > 0 else None,
        "forward_model_tflops_per_s_per_device": fwd_flops / t_fwd / 1e12,
        "forward_mfu": mfu(fwd_flops, t_fwd, peak),
        "forward_no_level_attention_mfu": mfu(na_flops, t_na, peak),
        "backward_mfu_estimate": mfu(2 * fwd_flops, backward, peak) if backward > 0 else None,
        "level_attention_share_of_forward_flops": 1 - na_flops / fwd_flops,
        "forward_memory_bytes": m_fwd, "num_devices": n_dev,
        "compile_s": {"forward": c_fwd, "forward_no_level_attention": c_na, "optimizer_and_ema": c_opt}})


def upsample_section(small, batches, num_steps, vae_dtype, report, budget, repeats, first_need: float):
    """``bench_upsample.measure`` per batch; a batch is skipped when less budget is left than
    ``first_need`` seconds (the first) or 1.2 x the previous batch's time."""
    ups, params, config = bench_upsample.build(small, vae_dtype)
    solver = SolverSpec(method=bench_upsample._METHOD.value, num_steps=num_steps)
    last = None
    for b in batches:
        need = 1.2 * last if last else first_need
        if budget.left() < need:
            report({"bench": "upsample", "batch": b, "skipped": "budget", "seconds_left": round(budget.left(), 1)})
            continue
        t0 = time.perf_counter()
        try:
            report(bench_upsample.measure(ups, params, config, b, solver=solver, repeats=repeats,
                                          lowres_side=bench_upsample._LOWRES_LATENT.value,
                                          vae_dtype=vae_dtype, small=small))
        except Exception as e:  # noqa: BLE001 - e.g. out of memory at a large batch: report, go on
            report({"bench": "upsample", "batch": b, "error": f"{type(e).__name__}: {e}"[:500]})
        last = time.perf_counter() - t0
        gc.collect()
    del params
    jax.clear_caches()


def main(argv):
    del argv
    t_start = time.perf_counter()
    small = _SMALL.value

    report = Reporter(_OUT.value)
    budget = Budget(_BUDGET.value if _BUDGET.value is not None else (300.0 if small else 450.0))
    size = _LATENT.value or (8 if small else 128)
    candidates = [int(b) for b in (_TRAIN_BATCHES.value or (["1", "2", "4", "8"] if small else
                                                             ["16", "32", "64", "128", "256"]))]
    steps = _STEPS.value or (2 if small else 10)
    given = flags.FLAGS.__getitem__  # bench_upsample's defaults are for the paper; --small shrinks them
    repeats = 1 if small and not given("repeats").present else bench_upsample._REPEATS.value
    up_batches = [] if not _UPSAMPLE.value else [int(b) for b in (
        ["1"] if small and not given("batches").present else bench_upsample._BATCHES.value)]
    num_steps = 3 if small and not given("num_steps").present else bench_upsample._NUM_STEPS.value

    dev = jax.devices()[0]
    peak, peak_source = peak_tflops(dev.device_kind, _PEAK.value)
    limit_device, limit_source = device_memory_limit(_MEM_LIMIT.value)
    limit = int(_MARGIN.value * limit_device)
    report({"bench": "accelerator_env", "device": dev.device_kind, "platform": dev.platform,
            "num_devices": jax.device_count(), "jax": jax.__version__, "host": platform.machine(),
            "python": sys.executable,
            "compilation_cache": os.environ.get("JAX_COMPILATION_CACHE_DIR", ""),  # a hit makes compile_s a load time
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "default (0.75 on GPU)"),
            "device_memory_limit_bytes": limit_device, "device_memory_limit_source": limit_source,
            "fit_limit_bytes": limit, "memory_margin": _MARGIN.value, "peak_tflops": peak,
            "peak_source": peak_source, "budget_s": round(budget.left(), 1), "small": small})

    config = paper_config(small, size)
    sections = {}
    try:
        pieces = train_section(config, size, candidates, limit, report, budget, steps, peak, _PROFILE_DIR.value,
                               _PROFILE_STEPS.value)
        sections["train"] = "ran" if pieces else "nothing fits"
    except Exception as e:  # noqa: BLE001 - report it and still run the inference section
        report({"bench": "train_step", "error": f"{type(e).__name__}: {e}"[:1000]})
        pieces, sections["train"] = None, "error"

    # The breakdown needs the train state; run it before freeing it for the upsampling bench.
    # Its compiles (two forwards, a small update) take somewhat less than one train-step compile.
    if pieces and _BREAKDOWN.value:
        upsample_reserve = 120.0 if (up_batches and not small) else 0.0
        need = 0.8 * pieces["compile_s"] + 10 * pieces["step_s"] + upsample_reserve
        if budget.left() >= need:
            try:
                breakdown_section(config, size, pieces, peak, report, repeats)
                sections["breakdown"] = "ran"
            except Exception as e:  # noqa: BLE001
                report({"bench": "train_breakdown", "error": f"{type(e).__name__}: {e}"[:500]})
                sections["breakdown"] = "error"
        else:
            report({"bench": "train_breakdown", "skipped": "budget", "seconds_left": round(budget.left(), 1),
                    "seconds_needed_estimate": round(need, 1)})
            sections["breakdown"] = "skipped (budget)"
    train_row = pieces["train_row"] if pieces else None
    pieces = None  # free the train state before the inference bench
    gc.collect()
    jax.clear_caches()

    if up_batches:
        try:
            upsample_section(small, up_batches, num_steps, bench_upsample._VAE_DTYPE.value, report, budget, repeats,
                             first_need=0.0 if small else 60.0)
            sections["upsample"] = "ran"
        except Exception as e:  # noqa: BLE001 - keep the train numbers and the summary
            report({"bench": "upsample", "error": f"{type(e).__name__}: {e}"[:500]})
            sections["upsample"] = "error"
    ups = [r for r in report.rows if r.get("bench") == "upsample" and "seconds_per_image" in r]
    report({"bench": "summary", "device": dev.device_kind, "sections": sections,
            "train_per_device_batch": train_row and train_row["per_device_batch"],
            "train_step_s": train_row and train_row["step_s"],
            "train_examples_per_s": train_row and train_row["examples_per_s"],
            "mfu": train_row and train_row["mfu"],
            "upsample_seconds_per_image": {str(r["batch"]): r["seconds_per_image"]["total"] for r in ups},
            "wall_s": round(time.perf_counter() - t_start, 1)})


if __name__ == "__main__":
    app.run(main)
