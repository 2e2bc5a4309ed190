"""Benchmark: train-step throughput, sampler latency per NFE, compile times, peak RSS.

    python bench/bench_train.py --config configs/quickstart.py
    python bench/bench_train.py --config configs/flow400_64-128/unet_base_psu.py --latent_size 32 --batch_size 1

Prints one JSON object. Batches are synthetic arrays of the right shapes (the train
step and the sampler only see latents; in latent-space configs the first stage is
not called when ``latent_lowres`` is already on the high-res grid, so a shape-only
stand-in is used and reported as such). Timings are medians over ``--steps`` calls
after a warm-up call, measured with ``block_until_ready``.
"""
import json
import os
import platform
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from cfm_jax import compile_options, sharding  # noqa: E402
from cfm_jax.ema import EMAConfig  # noqa: E402
from cfm_jax.first_stage import IdentityFirstStage, build_first_stage, scale_latents  # noqa: E402
from cfm_jax.model import CFMUpsampler  # noqa: E402
from cfm_jax.models.unet import count_params  # noqa: E402
from cfm_jax.optim import make_optimizer  # noqa: E402
from cfm_jax.solvers import SolverSpec  # noqa: E402
from cfm_jax.trainer import abstract_train_state, create_train_state, make_train_step  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/quickstart.py", "Config file.", lock_config=True)
_LATENT = flags.DEFINE_integer("latent_size", None, "High-res latent size (default: from data.image_size).")
_BATCH = flags.DEFINE_integer("batch_size", None, "Global batch (default: data.batch_size).")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed train steps / sampler calls.")
_NFE_STEPS = flags.DEFINE_integer("sampler_grid", 5, "Grid points of the timed Euler sampler.")


def _median_time(fn, n):
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv):
    del argv
    config = _CONFIG.value
    try:
        first_stage = build_first_stage(config)
        stand_in = False
    except (OSError, ValueError):  # no VAE checkpoint on this machine: shapes only
        first_stage = IdentityFirstStage(latent_channels=config.model.out_channels, downsample_factor=8,
                                         scale_factor=config.first_stage.scale_factor, name="shape-stand-in")
        stand_in = True
    up = CFMUpsampler(config, first_stage=first_stage)
    size = _LATENT.value or up.latent_size(config.data.image_size)
    batch_size = _BATCH.value or config.data.batch_size
    mesh = sharding.make_data_mesh()
    sharding.check_batch_size(batch_size, mesh, "--batch_size")
    c = first_stage.latent_channels
    rng = np.random.default_rng(0)
    host_batch = {
        "latent": rng.standard_normal((batch_size, size, size, c), np.float32),
        "latent_lowres": rng.standard_normal((batch_size, size, size, c), np.float32),
    }
    batch = sharding.shard_batch(host_batch, mesh)

    tx, schedule = make_optimizer(config.optim)
    train_step = make_train_step(up, tx, schedule, EMAConfig.from_config(config.ema), mesh,
                                 grad_accum_steps=config.optim.grad_accum_steps)
    abstract_state = abstract_train_state(up, tx, size, mesh)
    t0 = time.perf_counter()
    compiled = train_step.lower(abstract_state, batch).compile()
    compile_s = time.perf_counter() - t0
    state = create_train_state(up, tx, jax.random.PRNGKey(0), size, mesh)

    def one_step():
        nonlocal state
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)

    one_step()  # warm-up
    step_s = _median_time(one_step, _STEPS.value)

    grid = _NFE_STEPS.value
    solver = SolverSpec(method="euler", num_steps=grid)
    sample = jax.jit(lambda p, lowres, keys: up.sample(p, lowres, keys, size=size, solver=solver).x,
                     compiler_options=compile_options.inference())  # as eval.py and upsample compile it
    lowres = scale_latents(first_stage, batch["latent_lowres"])
    keys = jax.random.split(jax.random.PRNGKey(1), lowres.shape[0])
    t0 = time.perf_counter()
    sample_compiled = sample.lower(state.ema_params, lowres, keys).compile()
    sample_compile_s = time.perf_counter() - t0

    def one_sample():
        jax.block_until_ready(sample_compiled(state.ema_params, lowres, keys))

    one_sample()
    sample_s = _median_time(one_sample, max(2, _STEPS.value // 2))
    nfe = grid - 1
    result = {
        "benchmark": "train_step_and_sampler",
        "config": flags.FLAGS["config"].config_filename,
        "device": str(jax.devices()[0].device_kind), "num_devices": jax.device_count(),
        "platform": platform.machine(), "jax": jax.__version__,
        "cpu_convolutions": compile_options.describe(),
        "params": count_params(up.model, (size, size)),
        "compute_dtype": config.model.dtype, "param_dtype": config.model.param_dtype,
        "latent_size": size, "latent_channels": c, "global_batch": batch_size,
        "first_stage": first_stage.name + (" (not executed)" if stand_in else ""),
        "train_step_compile_s": round(compile_s, 3),
        "train_step_s": round(step_s, 5),
        "train_examples_per_s": round(batch_size / step_s, 3),
        "sampler": "euler", "sampler_nfe": nfe,
        "sampler_compile_s": round(sample_compile_s, 3),
        "sampler_s": round(sample_s, 5),
        "sampler_s_per_nfe": round(sample_s / nfe, 6),
        "sampler_s_per_nfe_per_example": round(sample_s / nfe / batch_size, 6),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "timed_calls": _STEPS.value,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    app.run(main)
