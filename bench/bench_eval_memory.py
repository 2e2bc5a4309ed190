"""Benchmark: does eval.py's host memory stay flat as the evaluation set grows?

    python bench/bench_eval_memory.py                         # records, 64 / 512 / 2048 images of 64²
    python bench/bench_eval_memory.py --source images         # a folder of PNG images instead
    python bench/bench_eval_memory.py --repeats 3             # median of 3 runs per size
    python bench/bench_eval_memory.py --eval_py /old/checkout/eval.py   # the same runs with another eval.py

Makes, in a scratch folder, a run directory with a randomly initialised quick-start model
(pixel space, 32² -> 64², identity first stage; a checkpoint written directly, no training)
and an evaluation set of up to ``max(--sizes)`` 64² crops of the bundled validation photos,
as prepared records (``--source records``, the run's validation split) or as a folder of
PNG files (``--source images``, ``eval.py --images``). Then runs ``eval.py`` on the first N
images for each N of ``--sizes``, each in a fresh process, and measures its peak resident
memory (``ru_maxrss`` of the finished child, read by a wrapper process started per run).

Prints one JSON object: per size the peak RSS (MiB) and the wall time, and
``peak_ratio_largest_over_smallest`` (the evaluator streams the set, so this should stay
near 1; ``flat``: at most ``--max_ratio``). The peak includes each batch's transient memory
(XLA's temporaries of the sampler) on top of a heap that malloc fragmentation grows a little
over a long run, so it varies by a few percent between runs (``--repeats``). Each of grain's
reading threads has its own malloc arena, which is why the evaluation loader reads with few
threads (``eval_data.READ_THREADS``). Measured peaks and ratios: docs/evaluation.md. FID is
off (the Inception on a CPU would take hours for these sizes); its bounded feature statistics
are described in ``cfm_jax/evaluation.py`` and docs/evaluation.md.
"""
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a host-memory benchmark: the run and eval.py on the CPU

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from PIL import Image  # noqa: E402

from cfm_jax import checkpointing, sharding  # noqa: E402
from cfm_jax.data import photos, prepare  # noqa: E402
from cfm_jax.model import CFMUpsampler  # noqa: E402
from cfm_jax.optim import make_optimizer  # noqa: E402
from cfm_jax.trainer import create_train_state  # noqa: E402
from configs.quickstart import get_config  # noqa: E402

_SIZES = flags.DEFINE_list("sizes", ["64", "512", "2048"], "Numbers of evaluated images.")
_SOURCE = flags.DEFINE_enum("source", "records", ["records", "images"], "Evaluation set: prepared records or an "
                            "image folder.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 64, "High-res side (the low-res side is half).")
_BATCH = flags.DEFINE_integer("batch_size", 16, "eval.py --batch_size.")
_SOLVERS = flags.DEFINE_string("solvers", "euler:2", "eval.py --solvers.")
_REPEATS = flags.DEFINE_integer("repeats", 1, "eval.py runs per size; the median peak is reported (the peak varies "
                                "by a few percent between runs).")
_MAX_RATIO = flags.DEFINE_float("max_ratio", 1.15, "Largest allowed peak(largest) / peak(smallest).")
_EVAL_PY = flags.DEFINE_string("eval_py", os.path.join(ROOT, "eval.py"), "The eval.py to measure.")
_TMP = flags.DEFINE_string("tmp", "", "Scratch folder (default: a temporary folder, removed at the end).")

# Runs a command and prints the peak RSS (KiB on Linux) of the finished child.
_WRAPPER = ("import resource, subprocess, sys\n"
            "rc = subprocess.run(sys.argv[1:]).returncode\n"
            "print('MAXRSS_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, 'RC', rc)\n")


def _config(records: str, image_size: int):
    c = get_config()
    c.data.update(name="records", path=records, prepare_photos=False, image_size=image_size,
                  lowres_size=image_size // 2)
    c.logging.update(progress_bar=False, tensorboard=False)
    return c


def _make_run(workdir: str, config) -> None:
    """config.json and a step-0 checkpoint of a randomly initialised model (what eval.py reads)."""
    up = CFMUpsampler(config)
    tx, _ = make_optimizer(config.optim)
    state = create_train_state(up, tx, jax.random.PRNGKey(0), up.latent_size(config.data.image_size),
                               sharding.make_mesh(config.mesh))
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    manager = checkpointing.make_manager(workdir)
    checkpointing.save(manager, 0, state, {"step": 0, "config": config.to_dict()})
    manager.close()


def _make_records(out: str, num: int, image_size: int) -> None:
    """``num`` random crops of the two validation photos as pixel-space records (split validation)."""
    prepare.prepare("photos:validation", out, split="validation", image_size=image_size,
                    lowres_size=image_size // 2, first_stage="identity", short_side=0, crop="random",
                    crops_per_image=-(-num // 2), images_per_shard=1, progress=False)
    prepare.finalize(out)


def _make_images(out: str, num: int, image_size: int) -> None:
    """``num`` validation crops of the bundled photos as PNG files."""
    os.makedirs(out, exist_ok=True)
    crops = photos.PhotoCrops("validation", image_size, image_size // 2, 64)
    for b in range(-(-num // 64)):
        images = np.round((crops.batch_at(b)["image"] + 1.0) * 127.5).astype(np.uint8)
        for i, image in enumerate(images):
            Image.fromarray(image).save(os.path.join(out, f"{b * 64 + i:05d}.png"))


def _measure(cmd: list[str]) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _WRAPPER, *cmd], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ))
    seconds = time.perf_counter() - t0
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("MAXRSS_KIB")), None)
    if line is None or not line.endswith("RC 0"):
        raise RuntimeError(f"eval.py failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return {"peak_rss_mib": round(int(line.split()[1]) / 1024, 1), "seconds": round(seconds, 1)}


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax's per-save chatter
    sizes = sorted(int(s) for s in _SIZES.value)
    tmp = _TMP.value or tempfile.mkdtemp(prefix="bench_eval_memory_")
    try:
        records, images = os.path.join(tmp, "records"), os.path.join(tmp, "images")
        if _SOURCE.value == "records" and not os.path.exists(os.path.join(records, "dataset_info.json")):
            _make_records(records, sizes[-1], _IMAGE_SIZE.value)
        if _SOURCE.value == "images" and not os.path.isdir(images):
            _make_images(images, sizes[-1], _IMAGE_SIZE.value)
        workdir = os.path.join(tmp, "run")
        if not os.path.exists(os.path.join(workdir, "config.json")):
            _make_run(workdir, _config(records, _IMAGE_SIZE.value))
        runs = []
        for n in sizes:
            cmd = [sys.executable, _EVAL_PY.value, "--workdir", workdir, "--num_images", str(n), "--batch_size",
                   str(_BATCH.value), "--solvers", _SOLVERS.value, "--out", os.path.join(tmp, f"eval_{n}")]
            if _SOURCE.value == "images":
                cmd += ["--images", images]
            measured = [_measure(cmd) for _ in range(_REPEATS.value)]
            row = {"num_images": n, "peak_rss_mib": round(statistics.median(m["peak_rss_mib"] for m in measured), 1),
                   "peak_rss_mib_each": [m["peak_rss_mib"] for m in measured],
                   "seconds": round(statistics.median(m["seconds"] for m in measured), 1)}
            with open(os.path.join(tmp, f"eval_{n}", "metrics.json")) as f:
                row["evaluated"] = json.load(f)["num_images"]
            runs.append(row)
        ratio = runs[-1]["peak_rss_mib"] / runs[0]["peak_rss_mib"]
        print(json.dumps({
            "source": _SOURCE.value, "image_size": _IMAGE_SIZE.value, "batch_size": _BATCH.value,
            "solvers": _SOLVERS.value, "eval_py": os.path.abspath(_EVAL_PY.value), "runs": runs,
            "peak_ratio_largest_over_smallest": round(ratio, 4), "max_ratio": _MAX_RATIO.value,
            "flat": ratio <= _MAX_RATIO.value, "cpu_count": os.cpu_count(), "machine": platform.machine()},
            indent=2))
    finally:
        if not _TMP.value:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    app.run(main)
