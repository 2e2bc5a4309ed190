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

The resampling (low-res images, PSU, resize kernels) is :mod:`cfm_jax.data.image_ops`.
"""

from __future__ import annotations

import functools
import math
from typing import Iterator

import numpy as np
import skimage.data
from PIL import Image

from cfm_jax.data import image_ops

__all__ = [
    "TRAIN_PHOTOS",
    "VALIDATION_PHOTOS",
    "VALIDATION_SEED",
    "photo_names",
    "load_photos",
    "PhotoCrops",
]

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
        super-resolution augmentations); default False: they lowered held-out PSNR on
        the quick start, so they are opt-in (docs/data.md, "Augmenting the bundled photo
        crops").
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
        self.lowres_filter = image_ops.check_lowres_filter(lowres_filter)
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
        image = image_ops.to_unit_range(crops)
        lowres = image_ops.make_lowres(image, self.lowres_size, self.lowres_filter)
        latent_lowres = np.clip(image_ops.upsample_bilinear(lowres, self.image_size), -1.0, 1.0)
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

    def __repr__(self) -> str:
        return (
            f"PhotoCrops(split={self.split!r}, image_size={self.image_size}, "
            f"lowres_size={self.lowres_size}, lowres_filter={self.lowres_filter!r}, "
            f"batch_size={self.batch_size}, seed={self.seed}, "
            f"photos={list(self.names)})"
        )
