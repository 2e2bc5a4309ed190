"""The measured effect of cfm-jax's deliberate differences from the original (docs/differences.md).

    .venv/bin/python bench/bench_differences.py [--crop 256] [--accum 4]

Prints one JSON object:

* ``ssim_clipping`` / ``mse_space``: on the real photos bundled with scikit-image (both
  splits), ``--crop``² centre crops are box-down-sampled x2 and x4 and up-sampled again with
  torch's bicubic (which overshoots [-1, 1]); SSIM with the images clipped to [0, 1] (ours)
  vs unclipped (the original's torchmetrics call), and MSE of the clipped [0, 1] images (ours)
  vs of the raw [-1, 1] images (the original's ``F.mse_loss``).
* ``fid_resize``: the Inception input of a 512² image resized to 299² by pytorch-fid's
  ``F.interpolate(bilinear, align_corners=False)`` (ours) vs TF1's bilinear resize without
  half-pixel centres (torchmetrics, the original's FID): mean and max absolute difference in
  8-bit units. (The FID change itself needs the FID Inception weights, which are not bundled.)
* ``accumulation``: with ``optim.grad_accum_steps=N`` the original steps its LR scheduler and
  EMA once per micro-batch (inside ``training_step``), we once per optimizer update: the LR
  and the EMA's per-update decay at a few updates, for the paper's schedule and EMA.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import dm_pix
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cfm_jax import metrics  # noqa: E402
from cfm_jax.data import image_ops, photos  # noqa: E402
from cfm_jax.ema import EMAConfig, ema_decay  # noqa: E402
from cfm_jax.optim import learning_rate_schedule  # noqa: E402
from configs.common import base_config  # noqa: E402


def _crops(size: int) -> np.ndarray:
    out = []
    for split in ("train", "validation"):
        for img in photos.load_photos(split):
            h, w = img.shape[:2]
            if min(h, w) < size:
                continue
            y, x = (h - size) // 2, (w - size) // 2
            out.append(img[y:y + size, x:x + size].astype(np.float32) / 127.5 - 1.0)
    return np.stack(out)


def ssim_and_mse(size: int) -> dict:
    hr = _crops(size)
    out = {"num_images": int(hr.shape[0]), "crop": size}
    for factor in (2, 4):
        pred = image_ops.upsample_bicubic(image_ops.downsample(hr, factor), size, convention="torch")
        overshoot = float(np.mean((pred < -1) | (pred > 1)))
        ours = np.asarray(metrics.ssim(jnp.asarray(pred), jnp.asarray(hr)))
        raw = np.asarray(dm_pix.ssim(jnp.asarray(hr / 2 + 0.5), jnp.asarray(pred / 2 + 0.5)))
        mse_ours = np.asarray(metrics.mse(jnp.asarray(pred), jnp.asarray(hr)))
        mse_raw = np.mean((pred - hr) ** 2, axis=(1, 2, 3))
        out[f"x{factor}"] = {
            "pixels_outside_range": overshoot,
            "ssim_clipped": float(ours.mean()), "ssim_unclipped": float(raw.mean()),
            "ssim_max_abs_diff": float(np.max(np.abs(ours - raw))),
            "mse_clipped_unit_range": float(mse_ours.mean()), "mse_raw_pm1": float(mse_raw.mean()),
            "mse_raw_over_clipped": float(mse_raw.mean() / mse_ours.mean()),
        }
    return out


def _bilinear_matrix(n_in: int, n_out: int, half_pixel: bool) -> np.ndarray:
    scale = n_in / n_out
    dst = np.arange(n_out, dtype=np.float64)
    src = (dst + 0.5) * scale - 0.5 if half_pixel else dst * scale
    src = np.clip(src, 0, n_in - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    m = np.zeros((n_out, n_in))
    m[np.arange(n_out), lo] += 1 - frac
    m[np.arange(n_out), hi] += frac
    return m


def fid_resize() -> dict:
    imgs = (_crops(512) + 1.0) * 127.5  # 0..255
    ours_m, tf1_m = _bilinear_matrix(512, 299, True), _bilinear_matrix(512, 299, False)
    diffs = []
    for img in imgs:
        a = np.einsum("pw,owc->opc", ours_m, np.einsum("oh,hwc->owc", ours_m, img))
        b = np.einsum("pw,owc->opc", tf1_m, np.einsum("oh,hwc->owc", tf1_m, img))
        diffs.append(np.abs(a - b))
    d = np.stack(diffs)
    return {"num_images": int(imgs.shape[0]), "mean_abs_diff_8bit": float(d.mean()),
            "max_abs_diff_8bit": float(d.max())}


def accumulation(n: int) -> dict:
    c = base_config()
    sched = learning_rate_schedule(c.optim)
    ema = EMAConfig.from_config(c.ema)
    rows = []
    for k in (0, 100, 249, 500, 999, 1000, 1001, 2000, 10_000, 100_000):
        # the original: micro-batches k*n .. k*n + n - 1 each step the scheduler and the EMA;
        # Lightning's optimizer step at the end of them runs at the last scheduler value
        orig_lr = float(sched(k * n + n - 1))
        counters = [k * n + i for i in range(n)]
        orig_keep = 1.0  # the fraction of the old EMA kept over one optimizer update
        for s in counters:
            copy = s <= ema.update_after_step + 1
            orig_keep *= 0.0 if copy else float(ema_decay(s, ema))
        ours_keep = 0.0 if k <= ema.update_after_step + 1 else float(ema_decay(k, ema))
        rows.append({"update": k, "lr_ours": float(sched(k)), "lr_original": orig_lr,
                     "ema_keep_ours": ours_keep, "ema_keep_original": orig_keep})
    return {"grad_accum_steps": n, "lr": c.optim.lr, "warmup_steps": c.optim.warmup_steps,
            "ema_update_after_step": ema.update_after_step, "ema_beta": ema.beta, "per_update": rows}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--accum", type=int, default=4)
    args = ap.parse_args()
    print(json.dumps({"ssim_clipping_and_mse_space": ssim_and_mse(args.crop), "fid_resize": fid_resize(),
                      "accumulation": accumulation(args.accum)}))


if __name__ == "__main__":
    main()
