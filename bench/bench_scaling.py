"""Benchmark: train-step time and memory per device over 1, 2, 4, 8 devices, data parallelism vs FSDP.

    python bench/bench_scaling.py
    python bench/bench_scaling.py --devices 1,2,4,8 --modes data,fsdp --steps 3 --batch_size 8
    python bench/bench_scaling.py --config configs/flow400_64-128/unet_base_psu.py --latent_size 16 --batch_size 8

Prints one JSON object: host information, one row per (number of devices, mode) and a note.
Each row is measured in its own subprocess (this script again, with ``--worker``), because
virtual CPU devices exist only if ``XLA_FLAGS=--xla_force_host_platform_device_count=N``
is set before JAX is imported. Modes: ``data`` is pure data parallelism (mesh
``data=N, fsdp=1``: the train state replicated on every device), ``fsdp`` is fully
sharded data parallelism (``data=1, fsdp=N``: params, Adam moments and EMA split over
the devices, ``cfm_jax/sharding.py``). The global batch is the same for every N (strong
scaling), synthetic ``latent``/``latent_lowres`` arrays (all the train step reads; the
training pipeline drops the pixels too).

Per row: the mesh, the ahead-of-time compile time of the train step, the median of
``--steps`` timed steps after one warm-up step (``block_until_ready`` on the metrics, the
donated state fed back), examples/s and the speed-up over N=1 of the same mode; memory
from ``compiled.memory_analysis()`` (argument, output, alias, temp and generated-code
bytes: these are *per device*, the SPMD program that each device runs) and the train
state's bytes on the first device, counted from the shards of the real arrays, next to
the whole state's bytes.

On a CPU host the N "devices" are threads of one process sharing the same cores, so
the step times do not scale (they mostly get worse, the collectives are copies): what
this benchmark shows on CPU is that every layout compiles and runs, and the memory per
device: FSDP divides the sharded part of the train state N-fold (arrays with fewer than
``mesh.fsdp_min_size`` elements stay replicated: ``state_replicated_bytes``), data
parallelism keeps the whole state on every device; the temp bytes (activations) shrink
with the per-device batch in both modes. XLA:CPU's ``peak_memory_bytes`` leaves the temp
buffers out, so read argument + temp bytes there. The time curve needs real accelerators;
the workers here always run on virtual CPU devices (``JAX_PLATFORMS=cpu``), whatever the
host has. With one device both modes are the same 1 x 1 mesh: it is measured once and
reported for both (``same_run_as_mode``).
"""
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from importlib import metadata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402  (a --worker run has its XLA_FLAGS device count from the parent's env, set before it started)
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from cfm_jax import sharding  # noqa: E402
from cfm_jax.ema import EMAConfig  # noqa: E402
from cfm_jax.model import CFMUpsampler  # noqa: E402
from cfm_jax.models.unet import count_params  # noqa: E402
from cfm_jax.optim import make_optimizer  # noqa: E402
from cfm_jax.trainer import abstract_train_state, create_train_state, make_train_step  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", os.path.join(ROOT, "configs/quickstart.py"), "Config file.",
                                          lock_config=True)
_DEVICES = flags.DEFINE_list("devices", ["1", "2", "4", "8"], "Numbers of virtual CPU devices.")
_MODES = flags.DEFINE_list("modes", ["data", "fsdp"], "Layouts: data (data=N, fsdp=1), fsdp (data=1, fsdp=N).")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed train steps per run (after one warm-up step).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Global batch, the same for every number of devices.")
_LATENT = flags.DEFINE_integer("latent_size", None, "High-res latent size (default: from data.image_size).")
_TIMEOUT = flags.DEFINE_integer("worker_timeout", 1800, "Seconds allowed to one run.")
_WORKER = flags.DEFINE_bool("worker", False, "Internal: measure one (devices, mode) run in this process.")

MODES = ("data", "fsdp")
NOTE = ("CPU host: the N devices are virtual devices of one process sharing the same cores, so step "
        "times and speed-ups do not show scaling (they need real accelerators). What these numbers "
        "show is that every layout compiles and runs, and the memory per device: FSDP divides the "
        "sharded part of the train state N-fold (arrays under mesh.fsdp_min_size elements, "
        "state_replicated_bytes, stay whole), data parallelism keeps the whole state on every "
        "device. memory_per_device comes from compiled.memory_analysis() and is per device (each "
        "device runs the same SPMD program); temp bytes (activations) shrink with the per-device "
        "batch in both modes; XLA:CPU's peak_memory_bytes leaves out the temp buffers.")
_MEMORY_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
                  "generated_code_size_in_bytes", "peak_memory_in_bytes")


def _mesh_sizes(n: int, mode: str) -> tuple[int, int]:
    return (n, 1) if mode == "data" else (1, n)


# --------------------------------------------------------------------------- worker: one run
def _worker(n: int, mode: str) -> dict:
    if jax.device_count() != n:
        raise RuntimeError(f"Expected {n} devices, JAX sees {jax.device_count()} (XLA_FLAGS not honoured?).")
    config = _CONFIG.value
    data, fsdp = _mesh_sizes(n, mode)
    with config.unlocked():
        config.mesh.update(data=data, fsdp=fsdp, dcn_data=1)
    mesh = sharding.make_mesh(config.mesh)
    up = CFMUpsampler(config)
    size = _LATENT.value or up.latent_size(config.data.image_size)
    c = up.first_stage.latent_channels
    batch_size = _BATCH.value
    sharding.check_batch_size(batch_size, mesh, "--batch_size")
    tx, schedule = make_optimizer(config.optim)
    min_size = config.mesh.fsdp_min_size

    abstract = abstract_train_state(up, tx, size, mesh, min_size)
    state_sharding = jax.tree.map(lambda a: a.sharding, abstract)
    layout = sharding.describe(abstract, state_sharding)
    state = create_train_state(up, tx, jax.random.PRNGKey(0), size, mesh, min_size)
    train_step = make_train_step(up, tx, schedule, EMAConfig.from_config(config.ema), mesh,
                                 grad_accum_steps=config.optim.grad_accum_steps, state_sharding=state_sharding)
    rng = np.random.default_rng(0)
    batch = sharding.shard_batch({
        "latent": rng.standard_normal((batch_size, size, size, c), np.float32),         # [B, l, l, C]
        "latent_lowres": rng.standard_normal((batch_size, size, size, c), np.float32),  # [B, l, l, C]
    }, mesh)

    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    memory = {k.replace("_size_in_bytes", "_bytes").replace("_in_bytes", "_bytes"): int(getattr(mem, k))
              for k in _MEMORY_FIELDS if getattr(mem, k, None) is not None}

    # The state as it really lies on the devices: bytes of the shards on the first device.
    first = mesh.devices.flat[0]
    leaves = jax.tree.leaves(state)
    state_bytes = sum(int(x.nbytes) for x in leaves)
    state_bytes_dev0 = sum(int(s.data.nbytes) for x in leaves for s in x.addressable_shards if s.device == first)
    replicated_bytes = sum(int(x.nbytes) for x in leaves if x.sharding.is_fully_replicated)

    def one_step():
        nonlocal state
        t = time.perf_counter()
        state, metrics = compiled(state, batch)  # the state is donated: feed back the new one
        jax.block_until_ready(metrics)
        return time.perf_counter() - t, metrics

    _, metrics = one_step()  # warm-up
    times = [one_step()[0] for _ in range(_STEPS.value)]
    step_s = statistics.median(times)
    loss = float(jax.device_get(metrics["loss"]))
    if not np.isfinite(loss):
        raise RuntimeError(f"Non-finite loss {loss} with {n} devices, mode {mode}.")
    return {
        "devices": n, "mode": mode, "mesh": {"data": data, "fsdp": fsdp},
        "device_kind": str(jax.devices()[0].device_kind), "platform": jax.devices()[0].platform,
        "params": count_params(up.model, (size, size)),
        "latent_size": size, "latent_channels": c, "global_batch": batch_size,
        "per_device_batch": batch_size // n,
        "compile_s": round(compile_s, 3),
        "step_s": round(step_s, 5),
        "step_s_all": [round(t, 5) for t in times],
        "examples_per_s": round(batch_size / step_s, 3),
        "state_bytes": state_bytes,
        "state_bytes_per_device": state_bytes_dev0,
        "state_bytes_per_device_planned": layout["bytes_per_device"],
        "state_replicated_bytes": replicated_bytes,
        "state_sharded_leaves": layout["sharded_leaves"], "state_replicated_leaves": layout["replicated_leaves"],
        "memory_per_device": memory,
        "loss": round(loss, 6),
        "num_traces": train_step.num_traces(),
        "worker_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


# --------------------------------------------------------------------------- parent: one subprocess per run
def _worker_env(n: int) -> dict:
    env = dict(os.environ)
    xla = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", "")).strip()
    env["XLA_FLAGS"] = f"{xla} --xla_force_host_platform_device_count={n}".strip()
    env["JAX_PLATFORMS"] = "cpu"  # virtual devices exist on the host platform only
    return env


def _run_worker(n: int, mode: str) -> dict:
    # The parent's own flags (config file and overrides included) again; later flags win.
    cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], f"--devices={n}", f"--modes={mode}",
           "--worker"]
    proc = subprocess.run(cmd, env=_worker_env(n), capture_output=True, text=True,
                          timeout=_TIMEOUT.value)
    if proc.returncode != 0:
        raise RuntimeError(f"Run with {n} devices, mode {mode} failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _parse_devices() -> list[int]:
    try:
        devices = [int(d) for d in _DEVICES.value]
    except ValueError:
        raise app.UsageError(f"--devices must be integers, got {_DEVICES.value}") from None
    for n in devices:
        if n < 1 or _BATCH.value % n:
            raise app.UsageError(f"--batch_size={_BATCH.value} is not divisible by {n} devices.")
    return devices


def main(argv):
    del argv
    devices = _parse_devices()
    modes = list(_MODES.value)
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise app.UsageError(f"--modes: unknown {bad}, choose from {list(MODES)}.")
    if _WORKER.value:
        if len(devices) != 1 or len(modes) != 1:
            raise app.UsageError("--worker measures one run: one --devices value and one --modes value.")
        print(json.dumps(_worker(devices[0], modes[0])))
        return

    rows = []
    t0 = time.perf_counter()
    for mode in modes:
        for n in devices:
            same = next((r for r in rows if r["devices"] == n and _mesh_sizes(n, r["mode"]) == _mesh_sizes(n, mode)),
                        None)
            if same is not None:  # one device: both modes are the same 1 x 1 mesh, the same program
                rows.append({**same, "mode": mode, "same_run_as_mode": same["mode"]})
                continue
            row = _run_worker(n, mode)
            print(f"{mode} x{n}: step {row['step_s']:.4f} s, state {row['state_bytes_per_device'] / 2**20:.2f} "
                  f"MiB per device", file=sys.stderr)
            rows.append(row)
    for row in rows:
        base = next((r for r in rows if r["mode"] == row["mode"] and r["devices"] == 1), None)
        row["speedup_vs_1"] = None if base is None else round(base["step_s"] / row["step_s"], 3)
        row["state_per_device_vs_1"] = (None if base is None else
                                        round(row["state_bytes_per_device"] / base["state_bytes_per_device"], 4))
    result = {
        "benchmark": "train_step_scaling",
        "config": os.path.relpath(flags.FLAGS["config"].config_filename, ROOT),
        "host": {"platform": platform.machine(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
                 "python": platform.python_version(), "jax": metadata.version("jax"),
                 "jaxlib": metadata.version("jaxlib")},
        "devices": devices, "modes": modes, "global_batch": _BATCH.value, "timed_steps": _STEPS.value,
        "total_s": round(time.perf_counter() - t0, 1),
        "rows": rows,
        "note": NOTE,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    app.run(main)
