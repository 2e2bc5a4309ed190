"""Benchmark: which low-res filter (``config.data.lowres_filter``) -- box or the original's bilinear?

    python bench/bench_lowres_filter.py                     # factors 2,3,4,8,1.5,2.5; ~40 s on 2 CPU cores
    python bench/bench_lowres_filter.py --factors 2,4 --tiles 1

On the photos bundled with scikit-image (all 15 of :mod:`cfm_jax.data.photos`, train and
validation): 240 x 240 tiles of native pixels, up to ``--tiles`` x ``--tiles`` of them from the
centre of each photo (fewer where the photo is smaller; 48 tiles with the default 2; 240 is
divisible by every default factor). For each factor the low-res image is made with each filter
of :func:`cfm_jax.data.image_ops.make_lowres`:

* ``box``: the exact area average (each low-res pixel averages the high-res pixels it covers,
  weighted by their overlap; the ``f x f`` block mean at integer factors), the default;
* ``bilinear``: PyTorch ``F.interpolate(mode='bilinear', align_corners=False)`` without
  antialiasing, what the original (``fmboost.helpers.resize_ims``) trains with;
* ``lanczos`` (the reference, not an option): PIL ``LANCZOS`` (Lanczos-3 windowed sinc, support
  widened by the factor), a near-ideal low-pass at the low-res Nyquist frequency -- what an
  antialiased down-scaler should output. It is chosen as the reference because it is neither of
  the two candidates and is the standard high-quality down-scaler (a Gaussian prefilter trades
  blur against aliasing by the choice of its sigma, which would bias the comparison).

(Before, ``box`` used PIL's ``BOX`` at non-integer factors, which samples a box of width
``factor`` at the input pixel centres rather than integrating it -- at x1.5 its outputs alternate
between a 2-pixel mean and a copy of one pixel -- and lost to bilinear there;
``docs/lowres_filter.md`` keeps those numbers.)

Metrics as the project's evaluation (:mod:`cfm_jax.metrics`: images in [-1, 1] mapped to [0, 1]
and clipped, PSNR in dB, SSIM with the 11x11 Gaussian window, sigma 1.5), computed with numpy and
scikit-image's equivalent ``structural_similarity`` (4x faster on a CPU than dm_pix), averaged over
the tiles:

* ``aliasing_psnr``: PSNR of the low-res image against the ``lanczos`` one (higher = closer to a
  band-limited down-sampling: less aliasing and less blur);
* ``{bicubic,bilinear}_{psnr,ssim}``: the low-res image up-sampled back to the high-res size
  with a plain up-sampler (bicubic: the evaluation's baseline ``image_ops.upsample_bicubic``;
  bilinear: PSU's ``F.interpolate`` bilinear) against the high-res crop: how much of the
  high-res image the low-res one keeps.

Prints one JSON object: ``results[factor][filter][metric]`` (means), ``box_minus_bilinear``
(per factor and metric), ``box_wins`` (tiles where box scores higher by more than 1e-3 dB / 1e-5
SSIM), the settings and the time.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from skimage.metrics import structural_similarity  # noqa: E402

from cfm_jax.data import image_ops, photos  # noqa: E402

TILE = 240  # divisible by 2, 3, 4, 8, 1.5 (240 / 1.5 = 160) and 2.5 (96)
METRICS = ("aliasing_psnr", "bicubic_psnr", "bicubic_ssim", "bilinear_psnr", "bilinear_ssim")
# a "win" is a margin above float rounding (at x2 the two filters differ by ~1e-7 per pixel)
WIN_MARGIN = {m: 1e-3 if m.endswith("psnr") else 1e-5 for m in METRICS}


def centre_tiles(photo: np.ndarray, tiles: int) -> list[np.ndarray]:
    """float32 [TILE, TILE, 3] tiles in [-1, 1] of native pixels: the centre k x k of them,
    k = min(tiles, short side // TILE)."""
    k = min(tiles, min(photo.shape[:2]) // TILE)
    y0, x0 = (photo.shape[0] - k * TILE) // 2, (photo.shape[1] - k * TILE) // 2
    image = photo.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    return [image[y0 + i * TILE:y0 + (i + 1) * TILE, x0 + j * TILE:x0 + (j + 1) * TILE]
            for i in range(k) for j in range(k)]


def lanczos(images: np.ndarray, size: int) -> np.ndarray:
    """PIL LANCZOS down-sampling of float [B, S, S, 3] images, channel by channel in float."""
    return np.stack([np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(im[:, :, c])).resize(
        (size, size), Image.Resampling.LANCZOS)) for c in range(im.shape[-1])], axis=-1) for im in images])


def to_unit(x: np.ndarray) -> np.ndarray:
    return np.clip(np.asarray(x, np.float64) / 2.0 + 0.5, 0.0, 1.0)


def psnr(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per-image PSNR (dB) of [B, H, W, C] images in [-1, 1], as ``cfm_jax.metrics.psnr``."""
    mse = np.mean((to_unit(pred) - to_unit(target)) ** 2, axis=(1, 2, 3))
    return -10.0 * np.log10(mse)


def ssim(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per-image SSIM, the settings of ``cfm_jax.metrics.ssim`` (see its module docstring)."""
    return np.array([structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                           data_range=1.0, channel_axis=-1)
                     for a, b in zip(to_unit(pred), to_unit(target))])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--factors", default="2,3,4,8,1.5,2.5", help="down-sampling factors (image / low-res side)")
    p.add_argument("--tiles", type=int, default=2, help="at most tiles x tiles 240-px tiles per photo")
    args = p.parse_args(argv)

    start = time.time()
    factors = [float(f) for f in args.factors.split(",")]
    names = photos.VALIDATION_PHOTOS + photos.TRAIN_PHOTOS
    tiles, tile_photos = [], []
    for split in ("validation", "train"):
        for name, photo in zip(photos.photo_names(split), photos.load_photos(split)):
            new = centre_tiles(photo, args.tiles)
            tiles += new
            tile_photos += [name] * len(new)
    hr = np.stack(tiles)  # [N, TILE, TILE, 3]
    filters = ("box", "bilinear", "lanczos")
    per_tile = {}  # factor -> filter -> metric -> [value per tile]
    for factor in factors:
        low_side = round(TILE / factor)
        if abs(low_side * factor - TILE) > 1e-6:
            raise ValueError(f"factor {factor}: the tile side {TILE} is not divisible by it")
        reference = lanczos(hr, low_side)
        key = f"x{factor:g}"
        per_tile[key] = {}
        for f in filters:
            low = reference if f == "lanczos" else image_ops.make_lowres(hr, low_side, f)
            up_bicubic = image_ops.upsample_bicubic(low, TILE)
            up_bilinear = image_ops.upsample_bilinear(low, TILE)
            values = {"bicubic_psnr": psnr(up_bicubic, hr), "bicubic_ssim": ssim(up_bicubic, hr),
                      "bilinear_psnr": psnr(up_bilinear, hr), "bilinear_ssim": ssim(up_bilinear, hr)}
            if f != "lanczos":
                values["aliasing_psnr"] = psnr(low, reference)
            per_tile[key][f] = {m: np.asarray(v, np.float64) for m, v in values.items()}

    results, diff, wins = {}, {}, {}
    for key, by_filter in per_tile.items():
        results[key] = {f: {m: round(float(np.mean(by_metric[m])), 4) for m in METRICS if m in by_metric}
                        for f, by_metric in by_filter.items()}
        box, bil = by_filter["box"], by_filter["bilinear"]
        diff[key] = {m: round(float(np.mean(box[m]) - np.mean(bil[m])), 4) + 0.0 for m in METRICS}  # no -0.0
        wins[key] = {m: f"{int(np.sum(box[m] > bil[m] + WIN_MARGIN[m]))}/{len(hr)}" for m in METRICS}
    out = {
        "benchmark": "lowres_filter",
        "command": " ".join(["python bench/bench_lowres_filter.py", *(argv if argv is not None else sys.argv[1:])]),
        "photos": {n: tile_photos.count(n) for n in names},  # name: tiles
        "tile": TILE,
        "reference": "PIL LANCZOS (Lanczos-3, support widened by the factor), float, per channel",
        "metrics": "as cfm_jax.metrics: [-1, 1] mapped to [0, 1] and clipped; SSIM 11x11 Gaussian, sigma 1.5; "
                   "means over tiles",
        "results": results,
        "box_minus_bilinear": diff,
        "box_wins": wins,
        "seconds": round(time.time() - start, 1),
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
