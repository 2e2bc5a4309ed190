"""Deterministic random crops of the real photos shipped with scikit-image.

This is the data source of the quick start: a small pixel-space Coupling Flow
Matching up-sampler trained on crops of the photos in ``skimage.data`` (all of
them ship inside the scikit-image wheel, nothing is downloaded).

Photos and the fixed split (by photo, never by crop)
----------------------------------------------------
Validation (held out: natural colour photos of everyday scenes, never seen in training,
native pixels; four different subjects -- a portrait, food, fur, a building and sky -- so
that a score is not one picture's texture)::

    astronaut (512x512), coffee (400x600), chelsea (300x451), rocket (427x640)

Train (11 photos)::

    colour:    stereo_motorcycle (500x741, left view), hubble_deep_field (872x1000),
               immunohistochemistry (512x512), retina (1411x1411)
    grayscale: camera, brick, grass, gravel, moon (all 512x512), coins (303x384),
               clock (300x400) -- repeated to 3 channels

Left out: ``colorwheel`` and ``logo`` (synthetic graphics, ``logo`` is RGBA on a
flat background), ``cat`` (an alias of ``chelsea``: it would leak/duplicate), the right
view of ``stereo_motorcycle`` (the left view's scene again),
``text``/``page`` (tiny document scans), ``cell`` and the data sets that need a
network download (``kidney``, ``lily``, ``eagle``, ...).

Crops
-----
A train sample picks a photo uniformly at random, a scale ``s`` and a square
region of ``image_size / s`` source pixels, and resamples that region to
``image_size`` x ``image_size`` with PIL's antialiased bicubic filter (Keys
a=-0.5, support widened by the reduction factor, uint8 result like a stored
photo), then flips it horizontally with probability 1/2.

* ``s = base * jitter``: ``base = min(1, max_short_side / short side)`` brings
  the two very large photos (retina, hubble_deep_field, mostly flat dark
  background at native resolution) down to a 512 px short side so that crops
  contain structure; ``jitter`` is log-uniform in ``scale_range`` (default
  (0.5, 1): zoomed-out views add scale diversity and more detail per pixel).
* If the photo is still smaller than the crop (short side * s < image_size),
  ``s`` is raised so that the short side fits the crop exactly (an up-scale of
  the photo, only for crops larger than the photo).
* When ``s == 1`` exactly (validation, or ``scale_range=None`` on a photo
  <= ``max_short_side``) the crop is an integer-aligned copy of native pixels,
  no resampling at all.

Validation samples use no flip and no jitter; the photo of sample ``k`` of the
stream (``k = step * batch_size + i``) is ``k % num_photos`` (balanced), and
the crop positions come from the fixed :data:`VALIDATION_SEED`, independent of
the run's ``seed``, so every run is validated on the same crops.

The batch of a step is a pure function of ``(seed, split, step)`` (its numpy
generator is seeded with ``SeedSequence([seed, split_id, step])``), so a resumed
run sees exactly the batches an uninterrupted run would.

Low-res version and PSU
-----------------------
``image_lowres = make_lowres(image, h, lowres_filter)`` (``config.data.lowres_filter``):

* ``'box'`` (default): the exact area average. Low-res pixel ``j`` covers the high-res
  interval ``[j s, (j + 1) s)``, ``s = H / h``, and averages the high-res pixels weighted
  by how much of each lies inside it (separable). At an integer factor that is the
  ``factor x factor`` block mean (:func:`downsample`); at a non-integer one (x1.5: weights
  2/3, 1/3 and 1/3, 2/3) the same weights as a matrix. Antialiased, numpy or jax, jittable.
* ``'bilinear'``: the original's ``fmboost.helpers.resize_ims(x, h, mode='bilinear')``,
  i.e. PyTorch ``F.interpolate(mode='bilinear', align_corners=False)`` *without*
  antialiasing, also for non-integer factors.

For factor 2 (the original's 64->128 and 512->1024 configs) the two are the same filter
(half-pixel centres sample at 2i+0.5: a 2x2 average). At x4 the bilinear one averages 2
of every 4 rows and columns and aliases. ``docs/lowres_filter.md`` compares them on these
photos: at integer factors above 2 the box image is far less aliased and keeps more of the
high-res image, hence the default (at non-integer factors the two nearly tie, see that page).

``latent_lowres = upsample_bilinear(image_lowres, H)`` (identity first stage,
pixel-space up-sampling = PSU), with the semantics of PyTorch
``F.interpolate(mode='bilinear', align_corners=False)`` -- which for up-sampling
is also ``jax.image.resize(method='bilinear')``.

:func:`resize` is the general resize with ``F.interpolate`` semantics (``bilinear``,
``bicubic``, ``area``, ``nearest``, ``nearest-exact``; up or down), also used by the
coupling's latent up-sampling modes (:mod:`cfm_jax.coupling`).

Resampling helpers work on numpy arrays (computed with numpy, host-side data
prep never touches an accelerator) and on jax arrays (computed with jnp,
jittable); both go through the same separable weight matrices (nearest modes: the same
index gathers).
"""

from __future__ import annotations

import functools
import math
from typing import Iterator

import numpy as np
from PIL import Image

__all__ = [
    "LOWRES_FILTERS",
    "RESIZE_METHODS",
    "TRAIN_PHOTOS",
    "VALIDATION_PHOTOS",
    "VALIDATION_SEED",
    "check_lowres_filter",
    "photo_names",
    "load_photos",
    "downsample",
    "lowres_filters_agree",
    "make_lowres",
    "resize",
    "upsample_bilinear",
    "upsample_bicubic",
    "PhotoCrops",
]

# How the low-res image is made from the high-res one (config.data.lowres_filter).
LOWRES_FILTERS: tuple[str, ...] = ("box", "bilinear")
# PyTorch F.interpolate modes :func:`resize` reproduces (align_corners=False, no antialiasing).
RESIZE_METHODS: tuple[str, ...] = ("bilinear", "bicubic", "area", "nearest", "nearest-exact")

# name -> True if grayscale (repeated to RGB). stereo_motorcycle returns a tuple
# (left, right, disparity); we take the left view.
_PHOTOS: dict[str, bool] = {
    # validation (held out)
    "astronaut": False,
    "coffee": False,
    "chelsea": False,
    "rocket": False,
    # train, colour
    "stereo_motorcycle": False,
    "hubble_deep_field": False,
    "immunohistochemistry": False,
    "retina": False,
    # train, grayscale
    "camera": True,
    "brick": True,
    "grass": True,
    "gravel": True,
    "moon": True,
    "coins": True,
    "clock": True,
}

VALIDATION_PHOTOS: tuple[str, ...] = ("astronaut", "coffee", "chelsea", "rocket")
TRAIN_PHOTOS: tuple[str, ...] = tuple(n for n in _PHOTOS if n not in VALIDATION_PHOTOS)
VALIDATION_SEED = 20240101  # validation crops never depend on the run's seed

_SPLITS = {"train": (0, TRAIN_PHOTOS), "validation": (1, VALIDATION_PHOTOS)}
_SPLIT_ALIASES = {"val": "validation", "valid": "validation", "eval": "validation"}


def _canonical_split(split: str) -> str:
    split = _SPLIT_ALIASES.get(split, split)
    if split not in _SPLITS:
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'validation'")
    return split


def photo_names(split: str) -> tuple[str, ...]:
    """Names (``skimage.data`` functions) of the photos of ``split``."""
    return _SPLITS[_canonical_split(split)][1]


@functools.lru_cache(maxsize=None)
def _load_photo(name: str) -> np.ndarray:
    import skimage.data

    img = getattr(skimage.data, name)()
    if isinstance(img, tuple):  # stereo_motorcycle: (left, right, disparity)
        img = img[0]
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise TypeError(f"skimage.data.{name}() has dtype {img.dtype}, expected uint8")
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"skimage.data.{name}() has shape {img.shape}, expected HxWx3")
    img = np.ascontiguousarray(img)
    img.setflags(write=False)  # shared by the cache
    return img


def load_photos(split: str) -> list[np.ndarray]:
    """The photos of ``split`` as read-only uint8 HxWx3 arrays (cached in-process)."""
    return [_load_photo(n) for n in photo_names(split)]


# ---------------------------------------------------------------------------
# Resampling
# ---------------------------------------------------------------------------


def _is_numpy(x) -> bool:
    return isinstance(x, (np.ndarray, np.generic, list, tuple))


def _as_float(x):
    """numpy in -> numpy float (float32 unless already float64); else jnp float."""
    if _is_numpy(x):
        x = np.asarray(x)
        return x if x.dtype in (np.float32, np.float64) else x.astype(np.float32)
    import jax.numpy as jnp

    x = jnp.asarray(x)
    return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.float32)


def downsample(images, factor: int):
    """Antialiased down-sampling by an integer ``factor``: ``factor x factor`` box average.

    ``images``: [..., H, W, C] (numpy -> numpy, jax array/tracer -> jax, jittable);
    H and W must be divisible by ``factor``. Integer inputs are converted to
    float32 first. See the module docstring for why a box filter.
    """
    factor = int(factor)
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    x = _as_float(images)
    if x.ndim < 3:
        raise ValueError(f"expected [..., H, W, C], got shape {x.shape}")
    *lead, h, w, c = x.shape
    if h % factor or w % factor:
        raise ValueError(f"spatial size {(h, w)} not divisible by factor {factor}")
    if factor == 1:
        return x
    x = x.reshape(*lead, h // factor, factor, w // factor, factor, c)
    return x.mean(axis=(-4, -2))


def _keys_cubic(a: float):
    def kernel(d):
        d = np.abs(d)
        near = ((a + 2.0) * d - (a + 3.0)) * d * d + 1.0
        far = ((a * d - 5.0 * a) * d + 8.0 * a) * d - 4.0 * a
        return np.where(d <= 1.0, near, np.where(d < 2.0, far, 0.0))

    return kernel


def _triangle(d):
    return np.maximum(0.0, 1.0 - np.abs(d))


def _torch_scale(n_in: int, n_out: int) -> np.float32:
    """PyTorch's ``input_size / output_size``, computed in float32 as its CPU kernels do."""
    return np.float32(n_in) / np.float32(n_out)


@functools.lru_cache(maxsize=256)
def _interp_matrix(n_in: int, n_out: int, method: str) -> np.ndarray:
    """[n_out, n_in] float32 weights of a 1-D resize with half-pixel centres.

    method:
      * ``bilinear``     triangle kernel, taps clamped to the border
                         (== torch bilinear, align_corners=False, antialias=False, up or
                         down; for up-sampling also == jax.image.resize 'bilinear').
      * ``bicubic_torch`` Keys a=-0.75, taps clamped to the border
                         (== torch bicubic, align_corners=False, antialias=False, up or down).
      * ``bicubic_jax``  Keys a=-0.5, out-of-image taps dropped and the rest
                         renormalised (== jax.image.resize 'bicubic' for up-sampling;
                         also Pillow's BICUBIC border handling).
      * ``area``         torch ``mode='area'`` == adaptive average pooling: output ``i``
                         averages inputs ``[floor(i n_in / n_out), ceil((i + 1) n_in / n_out))``
                         with equal weights.
      * ``box``          the exact area average (the ``'box'`` low-res filter): output ``i``
                         covers ``[i s, (i + 1) s)``, ``s = n_in / n_out``, and weights input
                         ``k`` by the length of ``[k, k + 1)`` inside it, divided by ``s``.
    """
    rows = np.arange(n_out)
    w = np.zeros((n_out, n_in), np.float64)
    if method == "box":
        # in units of 1 / n_out the interval of output i is [i n_in, (i + 1) n_in) and input k
        # is [k n_out, (k + 1) n_out): integer overlaps, so the weights are exact fractions
        cols = np.arange(n_in)
        lo = np.maximum(rows[:, None] * n_in, cols[None, :] * n_out)
        hi = np.minimum((rows[:, None] + 1) * n_in, (cols[None, :] + 1) * n_out)
        w = np.maximum(hi - lo, 0) / n_in  # overlap / n_out / s
    elif method == "area":
        start = rows * n_in // n_out
        end = -(-(rows + 1) * n_in // n_out)  # ceil, in integers like torch
        cols = np.arange(n_in)
        inside = (cols[None, :] >= start[:, None]) & (cols[None, :] < end[:, None])
        w = inside / (end - start)[:, None]
    elif method == "bicubic_jax":
        src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
        w = _keys_cubic(-0.5)(src[:, None] - np.arange(n_in, dtype=np.float64)[None, :])
        w /= w.sum(axis=1, keepdims=True)
    else:
        # torch's source coordinates, in float32 like its kernels (a float64 ``n_in / n_out``
        # moves the taps by ~1e-7 * n_in at non-integer ratios: ~1e-5 differences in the output)
        half = np.float32(0.5)
        src = (_torch_scale(n_in, n_out) * (np.arange(n_out, dtype=np.float32) + half) - half).astype(np.float64)
        kernel, radius = {"bilinear": (_triangle, 1), "bicubic_torch": (_keys_cubic(-0.75), 2)}[method]
        base = np.floor(src).astype(np.int64)
        for k in range(1 - radius, radius + 1):
            j = base + k
            np.add.at(w, (rows, np.clip(j, 0, n_in - 1)), kernel(src - j))
    w = w.astype(np.float32)
    w.setflags(write=False)
    return w


@functools.lru_cache(maxsize=256)
def _nearest_indices(n_in: int, n_out: int, exact: bool) -> np.ndarray:
    """[n_out] source indices of torch ``mode='nearest'`` (``floor(dst * s)``) or
    ``'nearest-exact'`` (``floor((dst + 0.5) * s)``), ``s = n_in / n_out``, with torch's float
    arithmetic (float32 ``s``; a float32 product for ``nearest``, a double one rounded to float
    for ``nearest-exact``), so that ties at non-integer ratios fall the same way."""
    scale = _torch_scale(n_in, n_out)
    dst = np.arange(n_out)
    if exact:
        src = np.floor(((dst + 0.5) * np.float64(scale)).astype(np.float32))
    else:
        src = np.floor(dst.astype(np.float32) * scale)
    idx = np.minimum(src.astype(np.int64), n_in - 1)
    idx.setflags(write=False)
    return idx


def _out_size(size) -> tuple[int, int]:
    out_h, out_w = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    return int(out_h), int(out_w)


def _resize_separable(images, size, method: str, *, up_only: bool = True):
    x = _as_float(images)
    if x.ndim < 3:
        raise ValueError(f"expected [..., H, W, C], got shape {x.shape}")
    out_h, out_w = _out_size(size)
    in_h, in_w = x.shape[-3], x.shape[-2]
    if up_only and (out_h < in_h or out_w < in_w):
        raise ValueError(f"up-sampling only: {(in_h, in_w)} -> {(out_h, out_w)}")
    wh = _interp_matrix(in_h, out_h, method)
    ww = _interp_matrix(in_w, out_w, method)
    if _is_numpy(x):
        wh, ww = wh.astype(x.dtype, copy=False), ww.astype(x.dtype, copy=False)
        y = np.einsum("oh,...hwc->...owc", wh, x, optimize=True)
        return np.einsum("pw,...owc->...opc", ww, y, optimize=True)
    import jax
    import jax.numpy as jnp

    hi = jax.lax.Precision.HIGHEST
    y = jnp.einsum("oh,...hwc->...owc", jnp.asarray(wh, x.dtype), x, precision=hi)
    return jnp.einsum("pw,...owc->...opc", jnp.asarray(ww, x.dtype), y, precision=hi)


def resize(images, size, method: str):
    """Resize [..., H, W, C] to ``size`` (int or (H', W')), up or down, exactly like PyTorch
    ``F.interpolate(x, size, mode=method, align_corners=False)`` without antialiasing.

    ``method``: ``bilinear``; ``bicubic`` (Keys a=-0.75, border-clamped taps; overshoots,
    not clipped); ``area`` (adaptive average pooling); ``nearest`` (``floor(dst * in/out)``);
    ``nearest-exact`` (``floor((dst + 0.5) * in/out)``, the centre rule). numpy in -> numpy
    out (host), jax in -> jax out (jittable; ``size`` static). Integer inputs become float32
    (nearest modes keep the dtype: they only gather).
    """
    if method not in RESIZE_METHODS:
        raise ValueError(f"resize method {method!r}; choose one of {RESIZE_METHODS}.")
    if method in ("nearest", "nearest-exact"):
        if np.ndim(images) < 3:
            raise ValueError(f"expected [..., H, W, C], got shape {np.shape(images)}")
        out_h, out_w = _out_size(size)
        in_h, in_w = np.shape(images)[-3:-1]
        exact = method == "nearest-exact"
        rows, cols = _nearest_indices(in_h, out_h, exact), _nearest_indices(in_w, out_w, exact)
        if _is_numpy(images):
            return np.asarray(images)[..., rows, :, :][..., cols, :]
        import jax.numpy as jnp

        x = jnp.asarray(images)
        return jnp.take(jnp.take(x, rows, axis=-3), cols, axis=-2)
    return _resize_separable(images, size, "bicubic_torch" if method == "bicubic" else method, up_only=False)


def check_lowres_filter(lowres_filter: str) -> str:
    """``lowres_filter`` if it is one of :data:`LOWRES_FILTERS`, else a ValueError that names
    the config key."""
    if lowres_filter not in LOWRES_FILTERS:
        raise ValueError(f"data.lowres_filter={lowres_filter!r} is not a known low-res filter; choose one of "
                         f"{LOWRES_FILTERS} ('box': area average, 'bilinear': the original's "
                         "F.interpolate(mode='bilinear') without antialiasing).")
    return lowres_filter


def make_lowres(images, lowres_size, lowres_filter: str = "box"):
    """The low-res version [..., h, w, C] of high-res images [..., H, W, C] (see the module
    docstring): ``lowres_size`` is an int (square) or (h, w).

    * ``'box'``: the exact area average -- :func:`downsample` by ``H // h`` when both sides
      divide by the same integer, otherwise separable area weights (``_interp_matrix(..., 'box')``,
      the same numbers to float rounding at integer factors); numpy or jax, jittable.
    * ``'bilinear'``: PyTorch ``F.interpolate(mode='bilinear', align_corners=False)``, no
      antialiasing, any sizes (numpy or jax, jittable).
    """
    check_lowres_filter(lowres_filter)
    x = _as_float(images)
    if x.ndim < 3:
        raise ValueError(f"expected [..., H, W, C], got shape {x.shape}")
    out_h, out_w = _out_size(lowres_size)
    h, w = x.shape[-3], x.shape[-2]
    if not (0 < out_h <= h and 0 < out_w <= w):
        raise ValueError(f"low-res size {(out_h, out_w)} must be in (0, {(h, w)}]")
    if lowres_filter == "bilinear":
        return resize(x, (out_h, out_w), "bilinear")
    if h % out_h == 0 and w % out_w == 0 and h // out_h == w // out_w:
        return downsample(x, h // out_h)  # the block mean, bit for bit as records made before
    return _resize_separable(x, (out_h, out_w), "box", up_only=False)


def lowres_filters_agree(image_size: int, lowres_size: int) -> bool:
    """Whether 'box' and 'bilinear' make the same low-res image (to float rounding) for these
    sizes: factor 1 (no resizing) or 2 (bilinear at half-pixel centres is a 2x2 average)."""
    return int(image_size) in (int(lowres_size), 2 * int(lowres_size))


def upsample_bilinear(images, size):
    """Bilinear up-sampling of [..., h, w, C] to ``size`` (int or (H, W)).

    Same result as PyTorch ``F.interpolate(mode='bilinear', align_corners=False)``
    and, for up-sampling, ``jax.image.resize(method='bilinear')``. numpy in ->
    numpy out (host), jax in -> jax out (jittable; ``size`` must be static).
    """
    return _resize_separable(images, size, "bilinear")


def upsample_bicubic(images, size, *, convention: str = "jax"):
    """Bicubic up-sampling (a baseline) of [..., h, w, C] to ``size`` (int or (H, W)).

    ``convention``:
      * ``"jax"`` (default): Keys cubic with a=-0.5, taps outside the image dropped
        and the remaining weights renormalised == ``jax.image.resize(method='bicubic')``
        (the same kernel as Pillow/TensorFlow/MATLAB bicubic).
      * ``"torch"``: a=-0.75 with border-replicated taps == PyTorch
        ``F.interpolate(mode='bicubic', align_corners=False)``, which the original
        code base would use for a bicubic baseline.
    Bicubic overshoots: the output can leave [-1, 1] slightly; it is not clipped
    (the metrics clip).
    """
    if convention not in ("jax", "torch"):
        raise ValueError(f"convention must be 'jax' or 'torch', got {convention!r}")
    return _resize_separable(images, size, f"bicubic_{convention}")


# ---------------------------------------------------------------------------
# Batch source
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _pil_photo(name: str) -> Image.Image:
    return Image.fromarray(_load_photo(name))


class PhotoCrops:
    """Deterministic batches of random crops of the skimage photos.

    ``batch_at(step)`` returns a dict of float32 NHWC arrays in [-1, 1]:
    ``image`` / ``latent`` [B, H, H, 3], ``latent_lowres`` [B, H, H, 3],
    ``image_lowres`` [B, h, h, 3] with H = ``image_size``, h = ``lowres_size``.
    See the module docstring for the sampling details.

    Args:
      split: ``'train'`` or ``'validation'`` (aliases ``'val'``, ``'eval'``).
      image_size: H, side of the high-res crop.
      lowres_size: h; ``image_size`` must be an integer multiple of it.
      batch_size: B.
      seed: run seed (train only; validation crops use :data:`VALIDATION_SEED`).
      scale_range: (lo, hi) log-uniform scale jitter for train; ``None`` = none.
        Ignored for validation.
      max_short_side: photos with a larger short side are down-scaled to it
        first (``None``: keep native resolution).
      flip: random horizontal flips; default True for train, False for validation.
      augment: random 90-degree rotations and colour-channel permutations (standard
        super-resolution augmentations); default False. Measured on the quick start
        (800 steps): they lowered held-out PSNR by 0.3 dB, so they are opt-in.
      start_step: first step produced by ``iter(self)``.
      lowres_filter: how ``image_lowres`` is made (:data:`LOWRES_FILTERS`, see
        :func:`make_lowres`; ``config.data.lowres_filter``).
    """

    def __init__(
        self,
        split: str,
        image_size: int,
        lowres_size: int,
        batch_size: int,
        seed: int = 0,
        *,
        scale_range: tuple[float, float] | None = (0.5, 1.0),
        max_short_side: int | None = 512,
        flip: bool | None = None,
        augment: bool | None = None,
        start_step: int = 0,
        lowres_filter: str = "box",
    ):
        self.split = _canonical_split(split)
        self.split_id, self.names = _SPLITS[self.split]
        self.train = self.split == "train"
        self.image_size = int(image_size)
        self.lowres_size = int(lowres_size)
        if self.lowres_size < 1 or self.image_size % self.lowres_size:
            raise ValueError(f"image_size {image_size} must be a multiple of lowres_size {lowres_size}")
        self.factor = self.image_size // self.lowres_size
        self.lowres_filter = check_lowres_filter(lowres_filter)
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.seed = int(seed)
        if self.seed < 0:
            raise ValueError("seed must be >= 0")
        if not self.train:
            scale_range = None
        if scale_range is not None:
            lo, hi = float(scale_range[0]), float(scale_range[1])
            if not 0.0 < lo <= hi:
                raise ValueError(f"bad scale_range {scale_range}")
            scale_range = (lo, hi)
        self.scale_range = scale_range
        self.flip = self.train if flip is None else bool(flip)
        self.augment = self.train and bool(augment)
        self.start_step = int(start_step)
        self.photos = load_photos(self.split)
        self.base_scales = [
            1.0 if max_short_side is None else min(1.0, max_short_side / min(p.shape[:2]))
            for p in self.photos
        ]

    # -- sampling ----------------------------------------------------------

    def _rng(self, step: int) -> np.random.Generator:
        seed = self.seed if self.train else VALIDATION_SEED
        return np.random.default_rng(np.random.SeedSequence([seed, self.split_id, int(step)]))

    def _crop(self, k: int, u_scale: float, u_y: float, u_x: float) -> np.ndarray:
        """uint8 [S, S, 3] crop of photo k; u_* are uniform [0, 1) draws."""
        photo = self.photos[k]
        ph, pw = photo.shape[:2]
        size = self.image_size
        s = self.base_scales[k]
        if self.scale_range is not None:
            lo, hi = self.scale_range
            s *= math.exp(math.log(lo) + u_scale * (math.log(hi) - math.log(lo)))
        s = max(s, size / min(ph, pw))
        if s == 1.0:  # native pixels, integer-aligned, no resampling
            y0 = min(int(u_y * (ph - size + 1)), ph - size)
            x0 = min(int(u_x * (pw - size + 1)), pw - size)
            return np.array(photo[y0 : y0 + size, x0 : x0 + size])
        side = min(size / s, ph, pw)  # region in source pixels (min guards rounding)
        y0 = u_y * (ph - side)
        x0 = u_x * (pw - side)
        box = (x0, y0, x0 + side, y0 + side)
        out = _pil_photo(self.names[k]).resize((size, size), Image.Resampling.BICUBIC, box=box)
        return np.asarray(out)

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        """The batch of ``step``: a pure function of (seed, split, step)."""
        step = int(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        b, n = self.batch_size, len(self.photos)
        rng = self._rng(step)
        if self.train:
            idx = rng.integers(0, n, size=b)
        else:  # balanced round-robin over the validation photos
            idx = (step * b + np.arange(b)) % n
        u = rng.random((b, 3))
        flips = rng.random(b) < 0.5
        crops = np.stack([self._crop(int(idx[i]), *u[i]) for i in range(b)])
        if self.flip:
            crops[flips] = crops[flips, :, ::-1]
        if self.augment:  # drawn after the draws above, so crops and flips do not change
            rotations = rng.integers(0, 4, size=b)
            perms = np.stack([rng.permutation(3) for _ in range(b)])
            crops = np.stack([np.rot90(c, k)[:, :, p] for c, k, p in zip(crops, rotations, perms)])
        image = crops.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
        lowres = make_lowres(image, self.lowres_size, self.lowres_filter)
        latent_lowres = np.clip(upsample_bilinear(lowres, self.image_size), -1.0, 1.0)
        return {
            "image": image,
            "latent": image.copy(),
            "latent_lowres": latent_lowres.astype(np.float32, copy=False),
            "image_lowres": lowres.astype(np.float32, copy=False),
        }

    def iter_from(self, step: int) -> Iterator[dict[str, np.ndarray]]:
        """Infinite iterator of ``batch_at(step), batch_at(step + 1), ...``."""
        step = int(step)
        while True:
            yield self.batch_at(step)
            step += 1

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self.iter_from(self.start_step)

    def validation_batches(self, num_batches: int) -> list[dict[str, np.ndarray]]:
        """``[batch_at(0), ..., batch_at(num_batches - 1)]`` -- for the validation split
        a fixed set of crops (same for every run)."""
        return [self.batch_at(i) for i in range(int(num_batches))]

    def __repr__(self) -> str:
        return (
            f"PhotoCrops(split={self.split!r}, image_size={self.image_size}, "
            f"lowres_size={self.lowres_size}, lowres_filter={self.lowres_filter!r}, "
            f"batch_size={self.batch_size}, seed={self.seed}, "
            f"photos={list(self.names)})"
        )
