"""Benchmark: does input ever starve training? Preparation and loader throughput against the
train step's consumption rate.

    python bench/bench_data.py                        # quick start (64² pixel records) + paper-shaped records
    python bench/bench_data.py --workers 0,1,2 --paper_examples 256
    python bench/bench_data.py --train_examples_per_sec 900   # compare with a rate measured on a TPU/GPU

Prints one JSON object:

* ``prepare``: ``python -m cfm_jax.data.prepare`` throughput (images/s, crops/s) on the bundled
  photos with the identity first stage (decode, resize, crop, box down-sampling, records
  written; no VAE). With ``--first_stage_path`` also with that autoencoder (encoding then
  dominates; on a CPU it is slow, measure on the machine that will prepare).
* ``loader``: examples/s of :func:`cfm_jax.data.pipeline.make_record_loader` (random access,
  decode, flip, batching) for ``--workers`` worker processes, as training reads them (latents
  only) and, for the paper shapes, with the pixels too (plus conversion and down-sampling of the
  image, as validation reads them), on
  (a) the quick start's pixel records (64², 3 channels) and
  (b) synthetic records of the paper's shapes (1024² uint8 image, 128²x4 float32 ``latent``
  and ``latent_lowres``: 3.0 MiB + 2 x 256 KiB per example), written once to ``--tmp``.
* ``train``: the train step's consumption (examples/s) of the quick-start config on this
  machine (median of ``--train_steps`` steps, same process), and ``headroom`` = loader rate /
  train rate for each worker count: above 1 the loader keeps up. For the paper config pass
  the step rate measured on the accelerator with ``--train_examples_per_sec``.
"""
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from cfm_jax import sharding  # noqa: E402
from cfm_jax.data import photos, pipeline, records  # noqa: E402

_WORKERS = flags.DEFINE_list("workers", ["0", "1", "2"], "Loader worker counts to time.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Loader batch size (per process).")
_QS_BATCHES = flags.DEFINE_integer("qs_batches", 60, "Timed batches of the quick-start records.")
_PAPER_EXAMPLES = flags.DEFINE_integer("paper_examples", 96, "Synthetic paper-shaped records to write.")
_PAPER_BATCHES = flags.DEFINE_integer("paper_batches", 24, "Timed batches of the paper-shaped records.")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 5, "Timed quick-start train steps (0: skip).")
_TRAIN_RATE = flags.DEFINE_float("train_examples_per_sec", 0.0,
                                 "A train-step rate measured elsewhere (accelerator) to compare the loader with.")
_FIRST_STAGE = flags.DEFINE_string("first_stage_path", "", "Also time preparation with this autoencoder.")
_TMP = flags.DEFINE_string("tmp", "", "Scratch folder (default: a temporary folder, removed at the end).")


def _loader_rate(path: str, workers: int, batch_size: int, num_batches: int, with_pixels: bool) -> dict:
    loader = pipeline.make_record_loader(path, batch_size=batch_size, seed=0, flip=True, worker_count=workers,
                                         worker_buffer_size=4, with_pixels=with_pixels)
    it = iter(loader)
    t0 = time.perf_counter()
    next(it)  # start-up (worker processes, first batch)
    startup = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(num_batches):
        next(it)
    seconds = time.perf_counter() - t0
    del it
    return {"workers": workers, "with_pixels": with_pixels,
            "examples_per_sec": round(num_batches * batch_size / seconds, 2),
            "startup_seconds": round(startup, 2)}


def _write_paper_shaped(path: str, n: int) -> None:
    """Synthetic records with the paper's shapes, written like the preparation command does."""
    features = records.features_dict(image_size=1024, latent_size=128, latent_channels=4, with_moments=False)
    rng = np.random.default_rng(0)
    shard_lengths, num_bytes = [], 0
    per_shard = 32
    num_shards = -(-n // per_shard)
    for shard in range(num_shards):
        count = min(per_shard, n - shard * per_shard)

        def examples(count=count, shard=shard):
            for i in range(count):
                yield {"image": rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8),
                       "latent": rng.standard_normal((128, 128, 4), dtype=np.float32),
                       "latent_lowres": rng.standard_normal((128, 128, 4), dtype=np.float32),
                       "file_name": f"synthetic_{shard}_{i}.png", "original_size": np.array([1024, 1024], np.int32),
                       "crop_index": 0, "crop_offset": np.zeros(2, np.int32)}
        c, b = records.write_shard(os.path.join(path, records.shard_filename("cfm_latents", "train", shard,
                                                                             num_shards)),
                                   examples(), features, tmp_dir=os.path.join(path, "tmp"))
        shard_lengths.append(c)
        num_bytes += b
    records.write_dataset_info(path, name="cfm_latents", features=features,
                               splits={"train": (shard_lengths, num_bytes)},
                               metadata={"image_size": 1024, "lowres_size": 512, "latent_size": 128,
                                         "latent_channels": 4, "with_moments": False,
                                         "first_stage": {"kind": "synthetic"}})


def _train_rate(steps: int) -> dict:
    # Not at the top: grain's loader workers are spawned processes that run this script's top level
    # again (as __mp_main__), so what sits there is imported by every worker, in its timed start-up.
    from cfm_jax.ema import EMAConfig  # lazy: kept out of grain's loader workers (see above)
    from cfm_jax.model import CFMUpsampler  # lazy: kept out of the loader workers
    from cfm_jax.optim import make_optimizer  # lazy: kept out of the loader workers
    from cfm_jax.trainer import create_train_state, make_train_step  # lazy: kept out of the loader workers
    from configs.quickstart import get_config  # lazy: kept out of the loader workers

    config = get_config()
    mesh = sharding.make_data_mesh()
    up = CFMUpsampler(config)
    tx, schedule = make_optimizer(config.optim)
    state = create_train_state(up, tx, jax.random.PRNGKey(0), config.data.image_size, mesh)
    step = make_train_step(up, tx, schedule, EMAConfig.from_config(config.ema), mesh)
    crops = photos.PhotoCrops("train", 64, 32, config.data.batch_size, seed=0)
    batch = sharding.shard_batch(crops.batch_at(0), mesh)
    state, m = step(state, batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    sec = statistics.median(times)
    return {"config": "configs/quickstart.py", "batch_size": config.data.batch_size,
            "seconds_per_step": round(sec, 4), "examples_per_sec": round(config.data.batch_size / sec, 2),
            "devices": int(np.prod(mesh.devices.shape))}


def main(argv):
    del argv
    from cfm_jax.data import prepare  # lazy: kept out of grain's loader workers (see _train_rate)

    workers = [int(w) for w in _WORKERS.value]
    tmp = _TMP.value or tempfile.mkdtemp(prefix="cfm_bench_data_")
    out: dict = {"bench": "data", "host": platform.node(), "cpus": os.cpu_count(),
                 "backend": jax.default_backend(), "loader_batch_size": _BATCH.value}
    try:
        # --- preparation
        qs = os.path.join(tmp, "photos_64x32")
        shutil.rmtree(qs, ignore_errors=True)
        s = prepare.prepare("photos:train", qs, image_size=64, lowres_size=32, short_side=300, crop="random",
                            crops_per_image=64, images_per_shard=4, progress=False)
        out["prepare"] = [{"first_stage": "identity", "source": "bundled photos (13, 300-1411 px)",
                           "crops": s["examples"], "seconds": s["seconds"],
                           "images_per_sec": s["images_per_second"],
                           "crops_per_sec": round(s["examples"] / s["seconds"], 1),
                           "bytes_per_example": round(s["num_bytes"] / s["examples"])}]
        if _FIRST_STAGE.value:
            vae_out = os.path.join(tmp, "photos_vae")
            t = prepare.prepare("photos:train", vae_out, image_size=512, lowres_size=256, short_side=512,
                                min_size=300, first_stage=_FIRST_STAGE.value, batch_size=4, progress=False)
            out["prepare"].append({"first_stage": _FIRST_STAGE.value, "image_size": 512,
                                   "crops": t["examples"], "seconds": t["seconds"],
                                   "images_per_sec": t["images_per_second"],
                                   "bytes_per_example": round(t["num_bytes"] / max(t["examples"], 1))})
        # --- loaders
        paper = os.path.join(tmp, "paper_shaped")
        shutil.rmtree(paper, ignore_errors=True)
        t0 = time.perf_counter()
        _write_paper_shaped(paper, _PAPER_EXAMPLES.value)
        out["paper_shaped_write_seconds_per_example"] = round((time.perf_counter() - t0) / _PAPER_EXAMPLES.value, 4)
        out["paper_shaped_bytes_per_example"] = round(
            sum(os.path.getsize(os.path.join(paper, f)) for f in os.listdir(paper) if ".array_record-" in f)
            / _PAPER_EXAMPLES.value)
        # training batches carry only the latents (with_pixels=False, as train.py reads them);
        # validation/evaluation batches also carry the images
        out["loader"] = {
            "quickstart_64px": [_loader_rate(qs, w, _BATCH.value, _QS_BATCHES.value, False) for w in workers],
            "paper_1024px": [_loader_rate(paper, w, _BATCH.value, _PAPER_BATCHES.value, False) for w in workers],
            "paper_1024px_with_pixels": [_loader_rate(paper, w, _BATCH.value, _PAPER_BATCHES.value, True)
                                         for w in workers]}
        # --- consumption
        if _TRAIN_STEPS.value > 0:
            out["train"] = _train_rate(_TRAIN_STEPS.value)
            rate = out["train"]["examples_per_sec"]
            out["headroom_quickstart"] = {str(r["workers"]): round(r["examples_per_sec"] / rate, 1)
                                          for r in out["loader"]["quickstart_64px"]}
        if _TRAIN_RATE.value > 0:
            out["headroom_paper_vs_given_rate"] = {
                str(r["workers"]): round(r["examples_per_sec"] / _TRAIN_RATE.value, 2)
                for r in out["loader"]["paper_1024px"]}
    finally:
        if not _TMP.value:
            shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    app.run(main)
