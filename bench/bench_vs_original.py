"""cfm-jax against the original CompVis/fm-boosting (PyTorch) on the same machine: train step
(EMA included on both sides), 40-point Euler sampling and peak RSS, with the paper's UNet
(305,806,340 parameters), random weights, fp32, 4-channel latents plus 4 context channels.

    .venv/bin/python bench/bench_vs_original.py --original /path/to/fm-boosting
    FMBOOST_ORIGINAL=/path/to/fm-boosting .venv/bin/python bench/bench_vs_original.py --batches 1,8

The original is never vendored: point ``--original`` (or ``$FMBOOST_ORIGINAL``) at a checkout
of https://github.com/CompVis/fm-boosting (measured at 8f38bd3). It runs in
``--torch_python`` (default: this interpreter; the original's ``fmboost/flow.py`` needs
einops, tqdm and torchdiffeq there: ``.venv/bin/pip install torchdiffeq==0.2.5``).

Every measurement runs in a fresh process (peak RSS is that process's ``ru_maxrss``), the
original first, then cfm-jax with the same batch, so the two sides of each ratio are
measured back to back (``--rounds`` repeats the whole sequence and takes medians). Both use
all ``--threads`` cores. Prints one JSON object (``RESULT {...}``) with both sides and the
ratios cfm-jax / original, and appends it to ``--out`` if given. ``--doc docs/benchmarks.md``
also rewrites the table between that file's ``<!-- vs-original -->`` markers with the result
(date, commit and CPU included); ``--from_result FILE`` writes the table from the last result
line of an earlier run's ``--out`` file instead of measuring.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

_ORIGINAL = flags.DEFINE_string("original", os.environ.get("FMBOOST_ORIGINAL"),
                                "Checkout of CompVis/fm-boosting (default: $FMBOOST_ORIGINAL).")
_TORCH_PYTHON = flags.DEFINE_string("torch_python", sys.executable, "Interpreter that runs the original.")
_BATCHES = flags.DEFINE_string("batches", "1,8", "Batch sizes, comma-separated.")
_TASKS = flags.DEFINE_string("tasks", "train,sample", "train and/or sample.")
_LATENT = flags.DEFINE_integer("latent_size", 32, "High-res latent size (4 channels).")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed train steps (median) after --warmup.")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed train steps first.")
_GRID = flags.DEFINE_integer("grid", 40, "Euler grid points (grid - 1 network evaluations).")
_REPEATS = flags.DEFINE_integer("sample_repeats", 1, "Timed sampler calls (median).")
_ROUNDS = flags.DEFINE_integer("rounds", 1, "Repeat the whole interleaved sequence; medians are reported.")
_THREADS = flags.DEFINE_integer("threads", os.cpu_count(), "Threads for torch (XLA:CPU uses all cores).")
_XLA_FLAGS = flags.DEFINE_string("xla_flags", None, "XLA_FLAGS for the cfm-jax side (default: inherited).")
_PROFILE = flags.DEFINE_integer("profile_calls", 0, "Also profile this many calls per measurement (after the "
                                "timed ones, which the profiler does not slow): time per op category on both sides.")
_OUT = flags.DEFINE_string("out", None, "Append the result line to this file.")
_SMALL = flags.DEFINE_bool("small", False, "A tiny UNet on both sides (checks the script; the numbers mean nothing).")
_DOC = flags.DEFINE_string("doc", None, "Rewrite the <!-- vs-original --> table of this markdown file.")
_FROM = flags.DEFINE_string("from_result", None, "Write the --doc table from the last RESULT line of this file "
                            "(an earlier run's --out) instead of measuring.")
_WORKER = flags.DEFINE_string("worker_spec", None, "Internal: run one cfm-jax measurement (JSON spec).")

from bench import doc_tables  # noqa: E402
from configs import PAPER_CONFIG, load_config  # noqa: E402

TABLE = "vs-original"  # the docs block --doc rewrites
# The targets, cfm-jax / original: train step (EMA included) and 40-point Euler sampling
TIME_TARGETS = {"train": 0.8, "sample": 0.7}

# --small: one level, one res block, attention at full resolution (the original's kwarg names)
SMALL_UNET = dict(model_channels=32, channel_mult=(1,), num_res_blocks=1, attention_resolutions=(1,),
                  num_heads=1, dim_head=16)


def jax_measurement(spec: dict) -> dict:
    """One cfm-jax measurement in this process: the paper config in fp32, the same shapes as the
    original's worker, the train step of train.py (Adam, EMA, metrics) or the Euler sampler of
    eval.py / upsample (``CFMUpsampler.sample`` with a ``SolverSpec``)."""
    # Imported here, in the --worker_spec process only: the parent stays free of jax, because a
    # child's ru_maxrss (the peak RSS both sides report) starts at its parent's RSS when it is spawned.
    import jax  # lazy: worker only (see above)
    import numpy as np  # lazy: worker only

    from cfm_jax import compile_options, host_memory, sharding  # lazy: worker only
    from cfm_jax.ema import EMAConfig  # lazy: worker only
    from cfm_jax.first_stage import IdentityFirstStage  # lazy: worker only
    from cfm_jax.model import CFMUpsampler  # lazy: worker only
    from cfm_jax.models.unet import count_params  # lazy: worker only
    from cfm_jax.optim import make_optimizer  # lazy: worker only
    from cfm_jax.solvers import SolverSpec  # lazy: worker only
    from cfm_jax.trainer import abstract_train_state, create_train_state, make_train_step  # lazy: worker only
    import xla_profile  # lazy: worker only (it imports jax)

    config = load_config(PAPER_CONFIG)
    config.model.dtype = "float32"  # the original's fp32 (it trains bf16-mixed on GPUs)
    if spec.get("small"):
        config.model.update(SMALL_UNET)
    # Latents are given on the high-res grid, so the autoencoder is never called: a shape-only
    # first stage keeps the benchmark free of the SD checkpoint.
    first_stage = IdentityFirstStage(latent_channels=4, downsample_factor=8,
                                     scale_factor=config.first_stage.scale_factor, name="shape-stand-in")
    up = CFMUpsampler(config, first_stage=first_stage)
    b, s = int(spec["batch"]), int(spec["latent_size"])
    mesh = sharding.make_data_mesh()
    rng = np.random.default_rng(0)
    host = {"latent": rng.standard_normal((b, s, s, 4), np.float32),
            "latent_lowres": rng.standard_normal((b, s, s, 4), np.float32)}
    batch = sharding.shard_batch(host, mesh)
    out = {"side": "cfm-jax", "task": spec["task"], "batch": b, "latent_size": s,
           "params": count_params(up.model, (s, s)), "jax": jax.__version__,
           "xla_flags": os.environ.get("XLA_FLAGS", ""), "cpu_convolutions": compile_options.describe()}
    if spec["task"] == "train":
        tx, schedule = make_optimizer(config.optim)
        step = make_train_step(up, tx, schedule, EMAConfig.from_config(config.ema), mesh)
        t0 = time.perf_counter()
        compiled = step.lower(abstract_train_state(up, tx, s, mesh), batch).compile()
        out["compile_s"] = round(time.perf_counter() - t0, 2)
        host_memory.release_freed_memory()  # as the trainer does after compiling and after creating the state
        state = create_train_state(up, tx, jax.random.PRNGKey(0), s, mesh)
        host_memory.release_freed_memory()

        def one():
            nonlocal state
            t = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)
            jax.block_until_ready(state)
            return time.perf_counter() - t

        for _ in range(int(spec["warmup"])):
            one()
        times = [one() for _ in range(int(spec["steps"]))]
        out.update(step_s=statistics.median(times), step_times_s=[round(t, 4) for t in times])
        if spec.get("profile_calls"):
            out["profile"] = xla_profile.profile_categories(compiled, one, int(spec["profile_calls"]))
    else:
        params = up.init(jax.random.PRNGKey(0), s, batch_size=1)
        solver = SolverSpec(method="euler", num_steps=int(spec["grid"]))
        lowres = batch["latent_lowres"] * first_stage.scale_factor
        keys = jax.random.split(jax.random.PRNGKey(1), b)
        # compiled like eval.py's and upsample's sampling programs
        fn = jax.jit(lambda p, lo, k: up.sample(p, lo, k, size=s, solver=solver).x,
                     compiler_options=compile_options.inference())
        t0 = time.perf_counter()
        compiled = fn.lower(params, lowres, keys).compile()
        out["compile_s"] = round(time.perf_counter() - t0, 2)
        times = []
        for _ in range(int(spec["repeats"])):
            t = time.perf_counter()
            jax.block_until_ready(compiled(params, lowres, keys))
            times.append(time.perf_counter() - t)
        out.update(sample_s=statistics.median(times), grid=int(spec["grid"]), nfe=int(spec["grid"]) - 1)
        if spec.get("profile_calls"):
            out["profile"] = xla_profile.profile_categories(
                compiled, lambda: jax.block_until_ready(compiled(params, lowres, keys)), int(spec["profile_calls"]))
    out["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def _run(cmd: list[str], env: dict) -> dict:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        raise SystemExit(f"measurement failed (exit {proc.returncode}): {' '.join(cmd[:2])} ...\n" + "\n".join(tail))
    return json.loads(lines[-1][len("RESULT "):])


def _verdict(value: float, target: float | None) -> str:
    if target is None:
        return "(none)"
    return f"≤ {target:g} met" if value <= target else f"≤ {target:g}: NOT met ({(value / target - 1) * 100:.1f}% over)"


def doc_table(result: dict) -> str:
    """The markdown of the ``vs-original`` block: provenance, then time and peak-RSS rows with
    the median ratio, the ratio of every round and the target."""
    m = result["measurements"]
    conv = result.get("cpu_convolutions") or {}
    head = (doc_tables.measured_by("bench/bench_vs_original.py", result)
            + f": {result['rounds']} round(s) (medians), {result['threads']} threads, a "
            f"{result['euler_grid']}-point Euler grid, latents {result['latent_size']}², cfm-jax's CPU convolutions "
            f"{', '.join(f'{k} {v}' for k, v in conv.items()) or 'not recorded'}.")
    lines = [head, "", "| what | original | cfm-jax | cfm-jax / original (rounds) | target |", "|---|---|---|---|---|"]

    def rounds(entry, key):
        per = entry.get(key)
        return f" ({', '.join(f'{r:.3f}' for r in per)})" if per and len(per) > 1 else ""

    def order(name):
        task, b = name.split("_b")
        return ("train", "sample").index(task), int(b)

    names = sorted(m, key=order)
    for name in names:
        e, (task, b) = m[name], name.split("_b")
        what = (f"train step, batch {b} (EMA included)" if task == "train"
                else f"{result['euler_grid']}-point Euler ({result['euler_grid'] - 1} NFE), batch {b}")
        lines.append(f"| {what} | {e['original_s']:.2f} s | {e['cfm_jax_s']:.2f} s | **{e['ratio']:.3f}**"
                     f"{rounds(e, 'ratios')} | {_verdict(e['ratio'], TIME_TARGETS[task])} |")
    for name in names:
        e, (task, b) = m[name], name.split("_b")
        what = "train step" if task == "train" else f"{result['euler_grid']}-point Euler"
        lines.append(f"| peak RSS, {what}, batch {b} | {e['original_peak_rss_mib']:.0f} MiB | "
                     f"{e['cfm_jax_peak_rss_mib']:.0f} MiB | **{e['rss_ratio']:.3f}**{rounds(e, 'rss_ratios')} | "
                     f"{_verdict(e['rss_ratio'], 1.0 if task == 'train' else None)} |")
    return "\n".join(lines)


def _last_result(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.startswith("RESULT ")]
    if not lines:
        raise SystemExit(f"--from_result={path}: no line starting with 'RESULT ' (use an --out file of this bench).")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv):
    del argv
    if _WORKER.value:
        print("RESULT " + json.dumps(jax_measurement(json.loads(_WORKER.value))), flush=True)
        return
    if _FROM.value:
        if not _DOC.value:
            raise SystemExit("--from_result needs --doc (the markdown file whose table it writes).")
        doc_tables.write_block(_DOC.value, TABLE, doc_table(_last_result(_FROM.value)))
        print(f"Rewrote the {TABLE} table of {_DOC.value}.")
        return
    original = _ORIGINAL.value
    if not original or not os.path.isfile(os.path.join(original, "fmboost", "flow.py")):
        raise SystemExit(f"--original={original!r} is not a checkout of CompVis/fm-boosting (no fmboost/flow.py); "
                         "clone https://github.com/CompVis/fm-boosting and pass its path with --original "
                         "or $FMBOOST_ORIGINAL.")
    batches = [int(x) for x in _BATCHES.value.split(",") if x]
    tasks = [x for x in _TASKS.value.split(",") if x]
    for task in tasks:
        if task not in ("train", "sample"):
            raise SystemExit(f"--tasks: unknown task {task!r}; choose from train, sample.")
    jax_env = dict(os.environ, JAX_PLATFORMS="cpu")
    if _XLA_FLAGS.value is not None:
        jax_env["XLA_FLAGS"] = _XLA_FLAGS.value
    runs: dict[str, list] = {}
    for _ in range(_ROUNDS.value):
        for task in tasks:
            for b in batches:
                spec = {"task": task, "batch": b, "latent_size": _LATENT.value, "steps": _STEPS.value,
                        "warmup": _WARMUP.value, "grid": _GRID.value, "repeats": _REPEATS.value,
                        "threads": _THREADS.value, "original": os.path.abspath(original),
                        "profile_calls": _PROFILE.value,
                        "small": SMALL_UNET if _SMALL.value else None}
                orig = _run([_TORCH_PYTHON.value, os.path.join(ROOT, "bench", "original_worker.py"),
                             json.dumps(spec)], dict(os.environ))
                ours = _run([sys.executable, os.path.abspath(__file__), "--worker_spec", json.dumps(spec)], jax_env)
                print(f"{task} batch {b}: original {json.dumps(orig)}\n{task} batch {b}: cfm-jax {json.dumps(ours)}",
                      file=sys.stderr, flush=True)
                runs.setdefault(f"{task}_b{b}", []).append((orig, ours))

    def med(pairs, side, key):
        return round(statistics.median(p[side][key] for p in pairs), 4)

    result = {"benchmark": "cfm-jax_vs_original", **doc_tables.provenance(), "original": os.path.abspath(original),
              "latent_size": _LATENT.value, "threads": _THREADS.value, "euler_grid": _GRID.value,
              "rounds": _ROUNDS.value, "xla_flags": jax_env.get("XLA_FLAGS", ""),
              "cpu_convolutions": next((p[1]["cpu_convolutions"] for v in runs.values() for p in v), None),
              "measurements": {}}
    for name, pairs in runs.items():
        key = "step_s" if name.startswith("train") else "sample_s"
        entry = {"original_s": med(pairs, 0, key), "cfm_jax_s": med(pairs, 1, key),
                 "original_peak_rss_mib": med(pairs, 0, "peak_rss_mib"),
                 "cfm_jax_peak_rss_mib": med(pairs, 1, "peak_rss_mib"),
                 "cfm_jax_compile_s": med(pairs, 1, "compile_s")}
        entry["ratio"] = round(entry["cfm_jax_s"] / entry["original_s"], 3)
        entry["rss_ratio"] = round(entry["cfm_jax_peak_rss_mib"] / entry["original_peak_rss_mib"], 3)
        entry["ratios"] = [round(ours[key] / orig[key], 3) for orig, ours in pairs]  # one per round
        entry["rss_ratios"] = [round(ours["peak_rss_mib"] / orig["peak_rss_mib"], 3) for orig, ours in pairs]
        if name.startswith("train"):
            entry["original_ema_s"] = med(pairs, 0, "ema_s")
            # Target: no more than the original's peak. Its worker keeps the original's EMA copy,
            # so that peak already is "the original's training plus one EMA copy of the parameters".
            entry["rss_target_mib"] = entry["original_peak_rss_mib"]
        if _PROFILE.value:
            entry["profile"] = {"original": pairs[-1][0]["profile"], "cfm_jax": pairs[-1][1]["profile"]}
        result["measurements"][name] = entry
    line = "RESULT " + json.dumps(result)
    print(line)
    if _OUT.value:
        with open(_OUT.value, "a") as f:
            f.write(line + "\n")
    if _DOC.value:
        doc_tables.write_block(_DOC.value, TABLE, doc_table(result))
        print(f"Rewrote the {TABLE} table of {_DOC.value}.")


if __name__ == "__main__":
    app.run(main)
