"""How the quick start's choices were measured (docs/quickstart.md): train a variant of
``configs/quickstart.py`` and score it on the held-out photos, full image and interior.

    .venv/bin/python bench/bench_quickstart.py --name base [--train_crops 64] \
        [--solvers euler:2,euler:3,euler:6] [--border_pads 0,4] [key=value ...]

``key=value`` overrides the config (``train.num_steps=900``, ``model.padding_mode=reflect``,
...; values are Python literals or strings). ``--train_crops`` is the number of random crops
prepared per training photo (the quick start's ``PHOTO_TRAIN_CROPS``); the records go to
``--records_root/<crops>`` and are reused. Validation is always the held-out split
(``photos.VALIDATION_PHOTOS``, 32 native-pixel crops each, ``--num_val_images`` of them).

After training, every ``--solvers`` entry is scored with every ``--border_pads`` value
(``sample.border_pad``), with the bicubic and bilinear baselines; the interior leaves out a
``--rim``-pixel frame. Prints one JSON line (``RESULT {...}``) and appends it to ``--out``.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _override(config, text: str) -> None:
    key, _, value = text.partition("=")
    if not _:
        raise SystemExit(f"error: {text!r} is not key=value")
    node, parts = config, key.split(".")
    for p in parts[:-1]:
        node = node[p]
    try:
        value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        pass  # a plain string
    node[parts[-1]] = value


def border_profile(ups, params, eval_set, solver, depth: int = 8) -> dict:
    """MSE of the pixels at distance d = 0 .. depth-1 from the nearest image edge, for the
    solver's prediction and for bicubic, and the mean signed error (prediction - truth, in
    [0, 1] units) at d = 0: how much of the error sits in a frame, and whether it is light or
    dark."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from cfm_jax.data import photos

    predict = jax.jit(lambda p, b, k: ups.predict(p, b, k, solver=solver)[0])
    latents = ups.make_latents_fn()
    sq = {"cfm": [], "bicubic": []}
    signed = []
    for i, batch in enumerate(eval_set):
        target = np.asarray(batch["image"], np.float32)
        keys = jax.vmap(lambda j: jax.random.fold_in(jax.random.PRNGKey(0), j))(
            jnp.arange(i * len(target), (i + 1) * len(target)))
        pred = np.asarray(predict(params, latents(batch), keys))
        bic = np.clip(np.asarray(photos.upsample_bicubic(batch["image_lowres"], target.shape[1])), -1, 1)
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
    import numpy as np

    from cfm_jax.data import photos, records

    def load(split, n):
        src = records.data_source(records_path, split)
        idx = np.linspace(0, len(src) - 1, min(n, len(src))).astype(int)
        images = np.stack([np.asarray(src[int(i)]["image"]) for i in idx])
        return images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else (images + 1) / 2  # [0, 1]

    def neighbourhoods(hi):
        lo = photos.downsample(hi, 2)
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
    bicubic = np.clip(np.asarray(photos.upsample_bicubic(photos.downsample(val, 2) * 2 - 1, val.shape[1])) / 2 + 0.5,
                      0, 1)
    return {"taps": taps, "train_crops": len(train), "val_crops": len(val), "bicubic": score(bicubic, val),
            "linear_fitted_on_train": score(apply(fit(train), val), val),
            "linear_fitted_on_validation (oracle)": score(apply(fit(val), val), val)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train_crops", type=int, default=None, help="crops per training photo (default: the "
                    "quick start's)")
    ap.add_argument("--solvers", default="euler:2,euler:3,euler:6")
    ap.add_argument("--border_pads", default="0")
    ap.add_argument("--rim", type=int, default=4)
    ap.add_argument("--profile", action="store_true", help="also the error by distance from the edge (first "
                    "solver)")
    ap.add_argument("--linear_reference", metavar="RECORDS", help="only fit and score the least-squares linear "
                    "up-sampler on these photo records (64x32) and exit")
    ap.add_argument("--name", default="")  # (required unless --linear_reference)
    ap.add_argument("--evaluate_only", action="store_true", help="score the run --name already trained")
    ap.add_argument("--num_val_images", type=int, default=128)
    ap.add_argument("--records_root", default=os.path.join(ROOT, "runs", "bench_quickstart", "records"))
    ap.add_argument("--runs_root", default=os.path.join(ROOT, "runs", "bench_quickstart"))
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "bench_quickstart", "results.jsonl"))
    ap.add_argument("overrides", nargs="*", help="config key=value")
    args = ap.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.linear_reference:
        out = {"linear_reference": linear_reference(args.linear_reference, rim=args.rim)}
        print("RESULT", json.dumps(out), flush=True)
        return out

    import ml_collections

    from cfm_jax.data import train_data
    from configs import quickstart

    if not args.name:
        ap.error("--name is required")
    crops = args.train_crops or train_data.PHOTO_TRAIN_CROPS
    train_data.PHOTO_TRAIN_CROPS = crops  # ensure_photo_records reads it when it prepares
    c = quickstart.get_config()
    c.logging.progress_bar = False
    for o in args.overrides:
        _override(c, o)
    c.train.eval_every = c.train.checkpoint_every = c.train.num_steps  # validate and save once, at the end
    c.data.path = os.path.join(args.records_root, str(crops))
    c.data.num_val_images = args.num_val_images
    workdir = os.path.join(args.runs_root, args.name)
    if not args.evaluate_only:
        shutil.rmtree(workdir, ignore_errors=True)

    from cfm_jax import checkpointing, evaluation, sharding
    from cfm_jax.data.train_data import make_data
    from cfm_jax.solvers import SolverSpec
    from cfm_jax.trainer import train
    from cfm_jax.upsampler import CFMUpsampler

    t0 = time.time()
    if not args.evaluate_only:
        train(c, workdir)
    out = {"name": args.name, "train_crops": crops, "overrides": args.overrides,
           "train_seconds": round(time.time() - t0, 1), "rim": args.rim, "scores": {}}
    params = checkpointing.read_params(workdir, use_ema=True)
    mesh = sharding.make_data_mesh()
    solvers = SolverSpec.parse_list(args.solvers)
    for i, pad in enumerate(int(p) for p in args.border_pads.split(",")):
        c2 = ml_collections.ConfigDict(c.to_dict())
        c2.sample.border_pad = pad
        ups = CFMUpsampler(c2)
        _, val = make_data(c2, ups.first_stage, n_devices=mesh.devices.size, train=False)
        ev = evaluation.Evaluator(ups, val, mesh, seed=c.seed, rim=args.rim)
        t1 = time.time()
        results, _ = ev.run(params, solvers, baselines=i == 0)
        for r in results:
            label = f"{r.label}@pad{pad}" if r.method == "cfm" else r.label
            out["scores"][label] = {"psnr_mean_mse": round(r.psnr_mean_mse, 3), "ssim": round(r.ssim, 4),
                                    "psnr_mean_mse_interior": round(r.psnr_mean_mse_interior, 3),
                                    "ssim_interior": round(r.ssim_interior, 4)}
        out[f"eval_seconds@pad{pad}"] = round(time.time() - t1, 1)
        if args.profile:
            out[f"border_profile@pad{pad}"] = border_profile(ups, params, val, solvers[0])
    print("RESULT", json.dumps(out), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(out) + "\n")
    return out


if __name__ == "__main__":
    main()
