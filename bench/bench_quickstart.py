"""How the quick start's choices were measured (docs/quickstart.md): train a variant of
``configs/quickstart.py`` and score it on the held-out photos, full image and interior.

    .venv/bin/python bench/bench_quickstart.py --name base [--train_crops 64] \
        [--solvers euler:2,euler:3,euler:6] [--border_pads 0,4 (default: the config's)] [--config.KEY=VALUE ...]

``--config.KEY=VALUE`` overrides ``configs/quickstart.py`` as in train.py
(``--config.train.num_steps=900``, ``--config.model.padding_mode=reflect``; a typo is an error). ``--train_crops`` is the number of random crops
prepared per training photo (the quick start's ``PHOTO_TRAIN_CROPS``); the records go to
``--records_root/<crops>`` and are reused. Validation is always the held-out split
(``photos.VALIDATION_PHOTOS``, 32 native-pixel crops each, ``--num_val_images`` of them).

After training (or with ``--evaluate_only``, ``--online`` for the online weights), every ``--solvers`` entry is scored with every ``--border_pads`` value
(``sample.border_pad``), with the bicubic and bilinear baselines; the interior leaves out a
``--rim``-pixel frame. Prints one JSON line (``RESULT {...}``) and appends it to ``--out``.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time

import jax
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cfm_jax import checkpointing, evaluation, sampling, sharding, trainer  # noqa: E402
from cfm_jax.data import image_ops, records, train_data  # noqa: E402
from cfm_jax.data.train_data import make_data  # noqa: E402
from cfm_jax.model import CFMUpsampler  # noqa: E402
from cfm_jax.solvers import SolverSpec  # noqa: E402


def border_profile(ups, params, eval_set, solver, depth: int = 8) -> dict:
    """MSE of the pixels at distance d = 0 .. depth-1 from the nearest image edge, for the
    solver's prediction and for bicubic, and the mean signed error (prediction - truth, in
    [0, 1] units) at d = 0: how much of the error sits in a frame, and whether it is light or
    dark."""
    predict = jax.jit(lambda p, b, k: ups.predict(p, b, k, solver=solver)[0])
    latents = ups.make_latents_fn()
    sq = {"cfm": [], "bicubic": []}
    signed = []
    for i, batch in enumerate(eval_set):
        target = np.asarray(batch["image"], np.float32)
        keys = sampling.example_keys(jax.random.PRNGKey(0), np.arange(i * len(target), (i + 1) * len(target)))
        pred = np.asarray(predict(params, latents(batch), keys))
        bic = np.clip(np.asarray(image_ops.upsample_bicubic(batch["image_lowres"], target.shape[1])), -1, 1)
        sq["cfm"].append(((pred - target) / 2) ** 2)
        sq["bicubic"].append(((bic - target) / 2) ** 2)
        signed.append((pred - target) / 2)
    h, w = target.shape[1:3]
    yy, xx = np.mgrid[:h, :w]
    dist = np.minimum(np.minimum(yy, h - 1 - yy), np.minimum(xx, w - 1 - xx))
    out = {}
    for k, v in sq.items():
        per_pixel = np.concatenate(v).mean(axis=(0, 3))
        out[f"mse_by_distance_{k}"] = [float(f"{per_pixel[dist == d].mean():.4g}") for d in range(depth)]
    out["mean_signed_error_at_edge_cfm"] = float(f"{np.concatenate(signed).mean(axis=(0, 3))[dist == 0].mean():.3g}")
    return out


def linear_reference(records_path: str, *, taps: int = 6, num_train: int = 1500, rim: int = 4) -> dict:
    """What a linear x2 up-sampler reaches: for each of the 4 output phases, a least-squares
    ``taps x taps`` filter on the low-res image (edge-padded), fitted on ``num_train`` training
    crops of the records and scored on the validation crops (PSNR of the mean MSE, full and
    interior), beside bicubic. Also the oracle fitted on the validation crops themselves."""
    def load(split, n):
        src = records.data_source(records_path, split)
        idx = np.linspace(0, len(src) - 1, min(n, len(src))).astype(int)
        images = np.stack([np.asarray(src[int(i)]["image"]) for i in idx])
        return images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else (images + 1) / 2  # [0, 1]

    def neighbourhoods(hi):
        lo = image_ops.downsample(hi, 2)
        p = taps // 2
        lp = np.pad(lo, ((0, 0), (p, p), (p, p), (0, 0)), mode="edge")
        h, w = lo.shape[1:3]
        return np.stack([lp[:, dy:dy + h, dx:dx + w] for dy in range(taps) for dx in range(taps)], -1)

    def fit(hi):
        x = neighbourhoods(hi).reshape(-1, taps * taps)
        return {(py, px): np.linalg.lstsq(x, hi[:, py::2, px::2].reshape(-1), rcond=None)[0]
                for py in range(2) for px in range(2)}

    def apply(filters, hi):
        x, out = neighbourhoods(hi), np.zeros_like(hi)
        for (py, px), f in filters.items():
            out[:, py::2, px::2] = x @ f
        return np.clip(out, 0, 1)

    def score(pred, hi):
        inner = (slice(None), slice(rim, -rim), slice(rim, -rim))
        return {"psnr_mean_mse": round(float(-10 * np.log10(np.mean((pred - hi) ** 2))), 3),
                "psnr_mean_mse_interior": round(float(-10 * np.log10(np.mean((pred[inner] - hi[inner]) ** 2))), 3)}

    train, val = load("train", num_train), load("validation", 10 ** 9)
    bicubic = np.clip(np.asarray(image_ops.upsample_bicubic(image_ops.downsample(val, 2) * 2 - 1, val.shape[1])) / 2 + 0.5,
                      0, 1)
    return {"taps": taps, "train_crops": len(train), "val_crops": len(val), "bicubic": score(bicubic, val),
            "linear_fitted_on_train": score(apply(fit(train), val), val),
            "linear_fitted_on_validation (oracle)": score(apply(fit(val), val), val)}


_NAME = flags.DEFINE_string("name", "", "Run name (a folder under --runs_root); required unless --linear_reference.")
_TRAIN_CROPS = flags.DEFINE_integer("train_crops", None, "Crops per training photo (default: the quick start's).")
_SOLVERS = flags.DEFINE_string("solvers", "euler:2,euler:3,euler:6", "Solvers to score.")
_BORDER_PADS = flags.DEFINE_string("border_pads", None, "sample.border_pad values to score, comma-separated "
                                   "(default: the config's).")
_RIM = flags.DEFINE_integer("rim", 4, "Interior: leave out this many pixels on every side.")
_PROFILE = flags.DEFINE_bool("profile", False, "Also the error by distance from the edge (first solver).")
_LINEAR = flags.DEFINE_string("linear_reference", None, "Only fit and score the least-squares linear up-sampler "
                              "on these photo records (64x32) and exit.")
_EVALUATE_ONLY = flags.DEFINE_bool("evaluate_only", False, "Score the run --name already trained.")
_ONLINE = flags.DEFINE_bool("online", False, "Score the online weights instead of the EMA.")
_NUM_VAL = flags.DEFINE_integer("num_val_images", 128, "Held-out crops to score.")
_RECORDS_ROOT = flags.DEFINE_string("records_root", os.path.join(ROOT, "runs", "bench_quickstart", "records"),
                                    "Records folder per crop count.")
_RUNS_ROOT = flags.DEFINE_string("runs_root", os.path.join(ROOT, "runs", "bench_quickstart"), "Run folders.")
_OUT = flags.DEFINE_string("out", os.path.join(ROOT, "runs", "bench_quickstart", "results.jsonl"),
                           "JSON lines file the result is appended to.")
# --config.KEY=VALUE overrides, checked against the config like train.py's (a typo is an error)
_CONFIG = config_flags.DEFINE_config_file("config", os.path.join(ROOT, "configs", "quickstart.py"), "Config file.",
                                          lock_config=True)


def main(argv) -> dict:
    del argv
    if "JAX_PLATFORMS" not in os.environ:  # the quick start's CPU numbers (jax read the variable on import)
        jax.config.update("jax_platforms", "cpu")
    if _LINEAR.value:
        out = {"linear_reference": linear_reference(_LINEAR.value, rim=_RIM.value)}
        print("RESULT", json.dumps(out), flush=True)
        return out
    if not _NAME.value:
        raise app.UsageError("--name is required")

    crops = _TRAIN_CROPS.value or train_data.PHOTO_TRAIN_CROPS
    train_data.PHOTO_TRAIN_CROPS = crops  # ensure_photo_records reads it when it prepares
    c = _CONFIG.value
    c.logging.progress_bar = False
    c.train.eval_every = c.train.checkpoint_every = c.train.num_steps  # validate and save once, at the end
    c.data.path = os.path.join(_RECORDS_ROOT.value, str(crops))
    c.data.num_val_images = _NUM_VAL.value
    workdir = os.path.join(_RUNS_ROOT.value, _NAME.value)
    if not _EVALUATE_ONLY.value:
        shutil.rmtree(workdir, ignore_errors=True)

    overrides = [a for a in sys.argv[1:] if a.startswith("--config.")]
    t0 = time.time()
    if not _EVALUATE_ONLY.value:
        trainer.train(c, workdir)
    out = {"name": _NAME.value, "train_crops": crops, "overrides": overrides, "online": _ONLINE.value,
           "train_seconds": round(time.time() - t0, 1), "rim": _RIM.value, "scores": {}}
    params = checkpointing.read_params(workdir, use_ema=not _ONLINE.value)
    mesh = sharding.make_data_mesh()
    solvers = SolverSpec.parse_list(_SOLVERS.value)
    pads = [int(p) for p in _BORDER_PADS.value.split(",")] if _BORDER_PADS.value else [int(c.sample.border_pad)]
    for i, pad in enumerate(pads):
        c2 = ml_collections.ConfigDict(c.to_dict())
        c2.sample.border_pad = pad
        ups = CFMUpsampler(c2)
        _, val = make_data(c2, ups.first_stage, n_devices=mesh.devices.size, train=False)
        ev = evaluation.Evaluator(ups, val, mesh, seed=c.seed, rim=_RIM.value)
        t1 = time.time()
        results, _ = ev.run(params, solvers, baselines=i == 0)
        for r in results:
            label = f"{r.label}@pad{pad}" if r.method == "cfm" else r.label
            out["scores"][label] = {k: round(getattr(r, k), 4) for k in (
                "psnr_mean_mse", "ssim", "psnr", "psnr_mean_mse_interior", "ssim_interior", "psnr_interior")}
        out[f"eval_seconds@pad{pad}"] = round(time.time() - t1, 1)
        if _PROFILE.value:
            out[f"border_profile@pad{pad}"] = border_profile(ups, params, val, solvers[0])
    print("RESULT", json.dumps(out), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    with open(_OUT.value, "a") as f:
        f.write(json.dumps(out) + "\n")
    return out


if __name__ == "__main__":
    app.run(main)
