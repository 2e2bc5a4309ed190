"""Image operations shared by data preparation, the training data, evaluation and the coupling.

Resampling with the semantics of PyTorch's ``F.interpolate`` (what the original uses), the low-res
image (box or the original's bilinear filter), the PSU up-sampling, the short-side resize and
crops of photos. Functions of arrays work on numpy arrays (computed with numpy: host-side data
preparation never touches an accelerator) and on jax arrays (computed with jnp, jittable); both
go through the same code: separable weight matrices, two-tap blends for bilinear (PyTorch's
arithmetic, its weights bit for bit) and index gathers for the nearest modes. This module is the
one bilinear resize of the project: the PSU coupling, the Inception input and the baselines use it.

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
``F.interpolate(mode='bilinear', align_corners=False)`` (``jax.image.resize(method='bilinear')``
is the same filter for up-sampling, with weights that differ in float rounding).

:func:`resize` is the general resize with ``F.interpolate`` semantics (``bilinear``,
``bicubic``, ``area``, ``nearest``, ``nearest-exact``; up or down), also used by the
coupling's latent up-sampling modes (:mod:`cfm_jax.coupling`).

"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

__all__ = [
    "LOWRES_FILTERS", "RESIZE_METHODS", "check_lowres_filter", "downsample", "downsample_antialiased",
    "lowres_filters_agree", "lowres_method", "make_crops", "make_lowres", "resize", "resize_short_side",
    "to_uint8", "to_unit_range", "upsample_bicubic", "upsample_bilinear",
]

# How the low-res image is made from the high-res one (config.data.lowres_filter).
LOWRES_FILTERS: tuple[str, ...] = ("box", "bilinear")
# PyTorch F.interpolate modes :func:`resize` reproduces (align_corners=False, no antialiasing).
RESIZE_METHODS: tuple[str, ...] = ("bilinear", "bicubic", "area", "nearest", "nearest-exact")


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


def _torch_scale(n_in: int, n_out: int) -> np.float32:
    """PyTorch's ``input_size / output_size``, computed in float32 as its CPU kernels do."""
    return np.float32(n_in) / np.float32(n_out)


@functools.lru_cache(maxsize=256)
def _interp_matrix(n_in: int, n_out: int, method: str) -> np.ndarray:
    """[n_out, n_in] float32 weights of a 1-D resize with half-pixel centres (bilinear is
    not here: it has two taps, :func:`_linear_taps`).

    method:
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
    elif method == "bicubic_torch":
        # torch's source coordinates, in float32 like its kernels (a float64 ``n_in / n_out``
        # moves the taps by ~1e-7 * n_in at non-integer ratios: ~1e-5 differences in the output)
        half = np.float32(0.5)
        src = (_torch_scale(n_in, n_out) * (np.arange(n_out, dtype=np.float32) + half) - half).astype(np.float64)
        kernel = _keys_cubic(-0.75)
        base = np.floor(src).astype(np.int64)
        for k in range(-1, 3):
            j = base + k
            np.add.at(w, (rows, np.clip(j, 0, n_in - 1)), kernel(src - j))
    else:
        raise ValueError(f"no weight matrix for {method!r}")
    w = w.astype(np.float32)
    w.setflags(write=False)
    return w


@functools.lru_cache(maxsize=256)
def _linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source rows ``i0, i1`` and weights ``w0, w1`` (each [n_out]) of PyTorch's bilinear resize
    along one axis (``align_corners=False``, no antialiasing), computed as its CPU kernel does.

    The source coordinate is ``(dst + 0.5) * s - 0.5`` with the float32 ``s = n_in / n_out``,
    rounded to float32 once (ATen's fused multiply-add), clamped below at 0 (so the edge rows
    are copied when up-sampling); ``i1 = min(i0 + 1, n_in - 1)``, ``w1 = src - i0`` and
    ``w0 = 1 - w1`` in float32. The weights then equal PyTorch's bit for bit.
    """
    scale = np.float64(_torch_scale(n_in, n_out))
    dst = np.arange(n_out, dtype=np.float64) + 0.5  # exact
    src = (dst * scale - 0.5).astype(np.float32)  # the float32 product is exact in float64: one rounding
    src = np.maximum(src, np.float32(0.0))
    i0 = np.minimum(src.astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = (src - i0.astype(np.float32)).astype(np.float32)
    w0 = (np.float32(1.0) - w1).astype(np.float32)
    for a in (i0, i1, w0, w1):
        a.setflags(write=False)
    return i0, i1, w0, w1


def _resize_bilinear(x, out_h: int, out_w: int):
    """Bilinear resize of float [..., H, W, C] as PyTorch's kernel computes it: along the width,
    then along the height, each output the blend ``w0 * x[i0] + w1 * x[i1]`` of two gathered
    inputs (cheaper than a weight matrix for large images, and PyTorch's arithmetic)."""
    xp = np if _is_numpy(x) else jnp
    in_h, in_w = x.shape[-3], x.shape[-2]
    if in_w != out_w:
        i0, i1, w0, w1 = _linear_taps(in_w, out_w)
        w0, w1 = xp.asarray(w0[:, None], x.dtype), xp.asarray(w1[:, None], x.dtype)
        x = x[..., i0, :] * w0 + x[..., i1, :] * w1
    if in_h != out_h:
        i0, i1, w0, w1 = _linear_taps(in_h, out_h)
        w0, w1 = xp.asarray(w0[:, None, None], x.dtype), xp.asarray(w1[:, None, None], x.dtype)
        x = x[..., i0, :, :] * w0 + x[..., i1, :, :] * w1
    return x


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
    if method == "bilinear":
        return _resize_bilinear(x, out_h, out_w)
    wh = _interp_matrix(in_h, out_h, method)
    ww = _interp_matrix(in_w, out_w, method)
    if _is_numpy(x):
        wh, ww = wh.astype(x.dtype, copy=False), ww.astype(x.dtype, copy=False)
        y = np.einsum("oh,...hwc->...owc", wh, x, optimize=True)
        return np.einsum("pw,...owc->...opc", ww, y, optimize=True)
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

    PyTorch ``F.interpolate(mode='bilinear', align_corners=False)``, computed as its CPU kernel
    does (``jax.image.resize(method='bilinear')`` to float rounding). numpy in ->
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
# Photos and records: short-side resize, crops, the low-res image, uint8 -> [-1, 1]
# ---------------------------------------------------------------------------


def resize_short_side(image: np.ndarray, short_side: int) -> np.ndarray:
    """uint8 [H, W, 3] -> short side == ``short_side`` (PIL antialiased bicubic)."""
    h, w = image.shape[:2]
    if min(h, w) == short_side:
        return image
    if h <= w:
        size = (max(short_side, round(w * short_side / h)), short_side)
    else:
        size = (short_side, max(short_side, round(h * short_side / w)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC))


def make_crops(image: np.ndarray, *, image_size: int, crop: str, crops_per_image: int,
               rng: np.random.Generator | None = None, min_scale: float = 1.0
               ) -> list[tuple[np.ndarray, tuple[int, int]]]:
    """``[(crop uint8 [S, S, 3], (top, left)), ...]`` of an image already resized.

    ``min_scale < 1`` (random crops only): each crop shows a square region of ``S / s``
    pixels, ``s`` log-uniform in ``[min_scale, 1]`` (at least ``S / short side``), resampled
    to ``S`` with PIL's antialiased bicubic filter: zoomed-out views, for scale diversity.
    """
    h, w = image.shape[:2]
    out = []
    pil = Image.fromarray(image) if min_scale < 1.0 else None
    for _ in range(crops_per_image):
        if crop == "center":
            y0, x0 = (h - image_size) // 2, (w - image_size) // 2
        elif pil is None:
            y0, x0 = int(rng.integers(0, h - image_size + 1)), int(rng.integers(0, w - image_size + 1))
        else:
            u_scale, u_y, u_x = rng.random(3)
            scale = max(math.exp(math.log(min_scale) * (1.0 - u_scale)), image_size / min(h, w))
            side = min(image_size / scale, h, w)
            top, left = u_y * (h - side), u_x * (w - side)
            region = pil.resize((image_size, image_size), Image.Resampling.BICUBIC,
                                box=(left, top, left + side, top + side))
            out.append((np.asarray(region), (int(round(top)), int(round(left)))))
            continue
        out.append((np.ascontiguousarray(image[y0:y0 + image_size, x0:x0 + image_size]), (y0, x0)))
    return out


def downsample_antialiased(images: np.ndarray, lowres_size: int, lowres_filter: str = "box") -> np.ndarray:
    """float32 [B, H, H, 3] -> [B, l, l, 3], the records' low-res images (``make_lowres``):
    ``lowres_filter='box'`` (default): the exact area average (``downsample`` for an integer
    factor, area-weighted otherwise); ``'bilinear'``: the original's ``F.interpolate(mode='bilinear')``
    without antialiasing (``--lowres_filter bilinear``)."""
    return np.asarray(make_lowres(images, lowres_size, lowres_filter), np.float32)


def lowres_method(lowres_filter: str, image_size: int, lowres_size: int) -> str:
    """The records' ``lowres_method`` metadata for ``lowres_filter``: ``box`` (integer factor) /
    ``box_area`` (non-integer factor, the area-weighted average) for the box filter, ``bilinear``
    for the original's filter. (Records of older versions may say ``pil_box``: PIL's ``BOX`` at a
    non-integer factor, another filter, which the record loader refuses.)"""
    if check_lowres_filter(lowres_filter) == "bilinear":
        return "bilinear"
    return "box" if image_size % lowres_size == 0 else "box_area"


def to_unit_range(images_uint8: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [-1, 1] (computed on the host, so that the training photos, records,
    evaluation crops and upsample's inputs are the same numbers bit for bit); :func:`to_uint8`
    is the way back."""
    return images_uint8.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def to_uint8(images):
    """Images in [-1, 1] -> uint8, ``(x + 1) * 127.5`` rounded (half to even) and clipped to
    [0, 255]; uint8 images unchanged. numpy in -> numpy out, jax in -> jax out (jittable)."""
    xp = np if _is_numpy(images) else jnp
    images = xp.asarray(images)
    if images.dtype == xp.uint8:
        return images
    return xp.clip(xp.round((images + 1.0) * 127.5), 0, 255).astype(xp.uint8)
