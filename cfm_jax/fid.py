"""Fréchet Inception Distance (FID) and patch-FID, with pytorch-fid's numbers.

The pieces, in the order an evaluation uses them:

* :class:`InceptionFeatures` -- jitted 2048-d pool3 features of the FID Inception-v3
  (`cfm_jax.models.inception`, weights from pytorch-fid's
  `pt_inception-2015-12-05-6726825d.pth` via `cfm_jax.convert.inception`), computed
  in fixed-size batches from NHWC images in [-1, 1] (our convention), [0, 1], or
  uint8.
* :func:`statistics` -- mean and covariance of a feature set, float64, as pytorch-fid
  (`np.mean(axis=0)`, `np.cov(rowvar=False)`).
* :func:`frechet_distance` -- ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`` in
  float64 with `scipy.linalg.sqrtm` and pytorch-fid's guards (see there).
* :func:`save_stats` / :func:`load_stats` -- pytorch-fid's `.npz` statistics files
  (keys `mu`, `sigma`), so reference statistics computed by either tool are
  interchangeable.
* :func:`crop_anchors` / :func:`take_crops` -- patch-FID as the original
  fm-boosting computes it (`fmboost/metrics.py`, `ImageMetricTracker`): from every
  image `num_crops` random `crop_size` x `crop_size` crops (the paper: 4 crops of 512²
  from each 1024² image), the *same* crop positions for the real and the generated
  image of a pair; the crops then go through FID like whole images (resized to 299).

    feats = InceptionFeatures.from_path("pt_inception-2015-12-05-6726825d.pth")
    mu_r, sig_r = statistics(feats(real_images))          # [N, H, W, 3] in [-1, 1]
    mu_g, sig_g = statistics(feats(generated_images))
    fid = frechet_distance(mu_r, sig_r, mu_g, sig_g)
    anchors = crop_anchors(seed, len(real_images), 4, real_images.shape[1:3], 512)
    real_p, gen_p = take_crops(real_images, anchors, 512), take_crops(generated_images, anchors, 512)
    patch_fid = frechet_distance(*statistics(feats(real_p)), *statistics(feats(gen_p)))

Differences from the original's numbers: fm-boosting computes FID with torchmetrics'
`FrechetInceptionDistance` on uint8 images, which runs torch-fidelity's port of the
same TF graph (the same architecture and state-dict names; its weights file
`weights-inception-2015-12-05-6726825d.pth` should convert here too, not tried) but
resizes to 299 with TF1's bilinear resize (no half-pixel centres) and maps uint8 with
`(x - 128) / 128`; pytorch-fid (and this module) resize with
`F.interpolate(align_corners=False)` and map [0, 1] with `2x - 1`. Expect FIDs close
to, not equal to, torchmetrics'. `quantize="floor"` reproduces the original's conversion
to uint8 (`(x * 127.5 + 127.5).clip(0, 255).to(torch.uint8)`), `"round"` that of
images saved as 8-bit PNGs (what pytorch-fid sees when run on image folders).
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg

from cfm_jax.convert.inception import load_fid_inception
from cfm_jax.models.inception import FEATURE_DIM, FIDInceptionV3

SQRTM_EPS = 1e-6  # pytorch-fid's `eps` of calculate_frechet_distance
IMAG_ATOL = 1e-3  # pytorch-fid's tolerance on the imaginary part of the diagonal
QUANTIZE_MODES = (None, "round", "floor")

__all__ = ["InceptionFeatures", "to_unit_range", "statistics", "frechet_distance", "save_stats",
           "load_stats", "load_features", "low_rank_frechet_distance", "features_fid", "crop_anchors", "take_crops",
           "SQRTM_EPS", "FEATURE_DIM"]


# ----------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------


def to_unit_range(images: jax.Array, *, value_range: Tuple[float, float] = (-1.0, 1.0), clip: bool = True,
                  quantize: Optional[str] = None) -> jax.Array:
    """NHWC images -> float32 in [0, 1], the FID Inception's input convention.

    uint8 images are read as 0..255 (exact, `value_range`, `clip` and `quantize`
    ignored). Floating images are mapped linearly from `value_range` to [0, 1], then
    clipped to [0, 1] when `clip` (generated images overshoot; pytorch-fid's inputs
    never do), then optionally snapped to the 256 levels of an 8-bit image:
    `quantize="round"` (as writing a PNG) or `"floor"` (as the original's
    `.to(torch.uint8)`; needs `clip`).
    """
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {QUANTIZE_MODES}, got {quantize!r}")
    images = jnp.asarray(images)
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32) / 255.0
    lo, hi = (float(v) for v in value_range)
    if not hi > lo:
        raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
    x = images.astype(jnp.float32)
    if quantize is None:
        x = (x - lo) / (hi - lo)
        return jnp.clip(x, 0.0, 1.0) if clip else x
    if quantize == "floor" and not clip:
        raise ValueError("quantize='floor' needs clip=True (uint8 conversion clips first)")
    # To 0..255 as `x * 127.5 + 127.5` for [-1, 1] (the original's float32 arithmetic).
    scale = 255.0 / (hi - lo)
    levels = x * scale + (-lo * scale)
    if clip:
        levels = jnp.clip(levels, 0.0, 255.0)
    levels = jnp.round(levels) if quantize == "round" else jnp.floor(levels)
    return levels / 255.0


class InceptionFeatures:
    """Jitted FID Inception pool3 features, [N, H, W, 3] images -> [N, 2048] float32.

    `model`, `variables`: from `cfm_jax.convert.inception.load_fid_inception` (or use
    `InceptionFeatures.from_path`). Images are NHWC RGB of any size (resized to 299x299
    inside, bilinear, as pytorch-fid); float images in `value_range` (default [-1, 1],
    the project's convention; pass `(0, 1)` for pytorch-fid's) or uint8 in 0..255.
    `clip` and `quantize`: see `to_unit_range`.

    `__call__` takes a host (numpy) or device array, runs it in batches of
    `batch_size` (the last one padded, so one compiled program serves every call with
    the same image size) and returns numpy features; batches are dispatched before
    any result is fetched, so transfers overlap compute. `features` is the jitted
    per-batch function, for a loop over a data pipeline or a batch already on device
    (e.g. sharded over a mesh's data axis).
    """

    def __init__(self, model: FIDInceptionV3, variables: Any, *, batch_size: int = 50,
                 value_range: Tuple[float, float] = (-1.0, 1.0), clip: bool = True,
                 quantize: Optional[str] = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        to_unit_range(jnp.zeros((1, 1, 1, 3)), value_range=value_range, clip=clip, quantize=quantize)  # validate
        self.model = model
        self.variables = variables
        self.batch_size = int(batch_size)
        self.value_range = tuple(float(v) for v in value_range)
        self.clip = clip
        self.quantize = quantize
        self._features = jax.jit(self._apply)

    @classmethod
    def from_path(cls, path, *, dtype=None, **kwargs) -> "InceptionFeatures":
        """From the `.pth` weights file or a converted folder (see `load_fid_inception`)."""
        model, variables = load_fid_inception(path, dtype=dtype)
        return cls(model, variables, **kwargs)

    def _apply(self, variables, images):
        x = to_unit_range(images, value_range=self.value_range, clip=self.clip, quantize=self.quantize)
        return self.model.apply(variables, x)  # [B, 2048] float32

    def features(self, images: jax.Array) -> jax.Array:
        """Features [B, 2048] of one batch [B, H, W, 3] (jitted; compiles once per shape)."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected NHWC RGB images [B, H, W, 3], got shape {images.shape}")
        return self._features(self.variables, images)

    def __call__(self, images) -> np.ndarray:
        """Features [N, 2048] (numpy float32) of images [N, H, W, 3], in batches."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected NHWC RGB images [N, H, W, 3], got shape {images.shape}")
        n = images.shape[0]
        out = []
        for start in range(0, n, self.batch_size):
            batch = images[start:start + self.batch_size]
            m = batch.shape[0]
            if m < self.batch_size:  # pad to the compiled batch size, drop the padding after
                pad = [(0, self.batch_size - m)] + [(0, 0)] * 3
                batch = np.pad(np.asarray(batch), pad) if isinstance(batch, np.ndarray) else jnp.pad(batch, pad)
            out.append((self.features(jnp.asarray(batch)), m))  # async: fetched below
        if not out:
            return np.zeros((0, FEATURE_DIM), np.float32)
        return np.concatenate([np.asarray(f)[:m] for f, m in out], axis=0)


# ----------------------------------------------------------------------------------
# Statistics and the distance
# ----------------------------------------------------------------------------------


def statistics(features) -> Tuple[np.ndarray, np.ndarray]:
    """`(mu [D], sigma [D, D])` of features [N, D] in float64: the mean and the unbiased
    covariance (`np.cov(rowvar=False)`, divides by N - 1), as pytorch-fid."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"statistics needs features [N, D] with N >= 2, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, *, eps: float = SQRTM_EPS) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    ``|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrtm(sigma1 @ sigma2))``, with
    pytorch-fid's handling of the matrix square root: when `scipy.linalg.sqrtm` of the
    product is not finite (a singular product, e.g. fewer samples than dimensions),
    `eps * I` is added to both covariances and the root taken again (with a warning);
    a complex result whose diagonal has imaginary parts within 1e-3 of zero is
    replaced by its real part, a larger imaginary part raises ValueError.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors have different shapes {mu1.shape} and {mu2.shape}")
    if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"covariances {sigma1.shape}, {sigma2.shape} do not match the means {mu1.shape}")

    diff = mu1 - mu2
    with warnings.catch_warnings():
        # scipy >= 1.16 warns on singular / ill-conditioned input; the finiteness check
        # below is pytorch-fid's criterion and handles it.
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            warnings.warn(f"FID: singular product of covariances; adding {eps} to their diagonals",
                          RuntimeWarning, stacklevel=2)
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=IMAG_ATOL):
            raise ValueError(f"FID: sqrtm(sigma1 @ sigma2) has an imaginary component of "
                             f"{np.max(np.abs(covmean.imag)):.3g} (the covariances are not valid, or far "
                             "too few samples)")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def low_rank_frechet_distance(features1, features2) -> float:
    """FID of two small feature sets (fewer samples than dimensions) without a D x D square root.

    With ``A = (F1 - mu1)^T / sqrt(N1 - 1)`` [D, N1] (so ``sigma1 = A A^T``) and ``B`` likewise,
    the non-zero eigenvalues of ``sigma1 sigma2 = A (A^T B B^T)`` are those of
    ``(A^T B)(A^T B)^T``, so ``tr sqrtm(sigma1 sigma2)`` is the sum of the singular values of the
    small ``A^T B`` [N1, N2]; ``tr sigma1 = |A|_F^2``. Mathematically the same distance as
    ``frechet_distance`` of the two sets' ``statistics``, in float64 (tested to 1e-7 relative against an eigendecomposition,
    whose square roots of rounding noise in the null directions limit the comparison, and to
    1e-4 against ``sqrtm``), where ``sqrtm`` of a rank-deficient 2048² product is slow (40 s
    on 2 CPU cores) and ill-conditioned.
    """
    f1, f2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
        raise ValueError(f"feature sets must be [N1, D] and [N2, D], got {f1.shape} and {f2.shape}")
    if min(len(f1), len(f2)) < 2:
        raise ValueError("FID needs at least 2 samples per set.")
    mu1, mu2 = f1.mean(axis=0), f2.mean(axis=0)
    a = (f1 - mu1).T / np.sqrt(len(f1) - 1)
    b = (f2 - mu2).T / np.sqrt(len(f2) - 1)
    trace_sqrt = np.sum(np.linalg.svd(a.T @ b, compute_uv=False))
    diff = mu1 - mu2
    return float(diff @ diff + np.sum(a * a) + np.sum(b * b) - 2.0 * trace_sqrt)


def features_fid(features1, features2) -> float:
    """FID of two feature sets: :func:`low_rank_frechet_distance` when a set has fewer samples
    than dimensions, else pytorch-fid's computation (``frechet_distance`` of the two sets' ``statistics``)."""
    f1, f2 = np.asarray(features1), np.asarray(features2)
    if min(len(f1), len(f2)) <= f1.shape[1]:
        return low_rank_frechet_distance(f1, f2)
    return frechet_distance(*statistics(f1), *statistics(f2))


def save_stats(path, mu, sigma, *, features=None) -> None:
    """Writes pytorch-fid's statistics file: compressed `.npz` with `mu` [D], `sigma` [D, D]
    (and optionally the `features` [N, D] themselves, which pytorch-fid ignores and
    :func:`load_features` returns, for :func:`features_fid` on small sets).

    numpy appends `.npz` to `path` when it lacks that suffix (as in pytorch-fid's
    `--save-stats`).
    """
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0],) * 2:
        raise ValueError(f"expected mu [D] and sigma [D, D], got {mu.shape} and {sigma.shape}")
    extra = {} if features is None else {"features": np.asarray(features, np.float32)}
    np.savez_compressed(os.fspath(path), mu=mu, sigma=sigma, **extra)


def load_features(path) -> Optional[np.ndarray]:
    """The `features` saved beside the statistics by :func:`save_stats`, or None."""
    with np.load(os.fspath(path)) as f:
        return np.asarray(f["features"]) if "features" in f.files else None


def load_stats(path) -> Tuple[np.ndarray, np.ndarray]:
    """`(mu, sigma)` (float64) from a pytorch-fid `.npz` statistics file (ours or theirs)."""
    with np.load(os.fspath(path)) as f:
        missing = [k for k in ("mu", "sigma") if k not in f.files]
        if missing:
            raise ValueError(f"{path} is not an FID statistics file: no {' or '.join(missing)} "
                             f"(it holds {sorted(f.files)})")
        return np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)


# ----------------------------------------------------------------------------------
# Patch-FID crops
# ----------------------------------------------------------------------------------


def _key(key_or_seed) -> jax.Array:
    if isinstance(key_or_seed, (int, np.integer)):
        return jax.random.PRNGKey(int(key_or_seed))
    return key_or_seed


def crop_anchors(key, num_images: int, num_crops: int, image_size: Union[int, Sequence[int]],
                 crop_size: int) -> jax.Array:
    """Top-left corners [num_images, num_crops, 2] (row, column; int32) of random crops.

    Each corner is uniform over every position that keeps the crop inside the image
    (`torchvision.transforms.RandomCrop.get_params`: row in [0, H - crop_size], column
    in [0, W - crop_size]), drawn independently per image and crop from `key` (a PRNG
    key or an int seed).
    """
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if crop_size > h or crop_size > w or crop_size < 1:
        raise ValueError(f"crop_size {crop_size} does not fit images of size {h}x{w}")
    k_row, k_col = jax.random.split(_key(key))
    rows = jax.random.randint(k_row, (num_images, num_crops), 0, h - crop_size + 1, dtype=jnp.int32)
    cols = jax.random.randint(k_col, (num_images, num_crops), 0, w - crop_size + 1, dtype=jnp.int32)
    return jnp.stack([rows, cols], axis=-1)


def take_crops(images: jax.Array, anchors: jax.Array, crop_size: int) -> jax.Array:
    """Crops [N * K, crop_size, crop_size, C] of images [N, H, W, C] at anchors [N, K, 2],
    image-major (crop `k` of image `i` at row `i * K + k`, the original's order)."""
    images = jnp.asarray(images)

    def crop(image, anchor):  # [H, W, C], [2] -> [c, c, C]
        return jax.lax.dynamic_slice(image, (anchor[0], anchor[1], 0), (crop_size, crop_size, image.shape[-1]))

    per_image = jax.vmap(jax.vmap(crop, in_axes=(None, 0)))(images, anchors)  # [N, K, c, c, C]
    return per_image.reshape((-1,) + per_image.shape[2:])
