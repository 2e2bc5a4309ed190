"""Where the evaluation's images come from: fixed sets, read batch by batch.

Training validation and ``eval.py`` score a fixed set of images with one
:class:`cfm_jax.evaluation.Evaluator`. The set is an :class:`EvalSet`: its number of images
and its global batch size are known up front, and every ``iter(eval_set)`` reads the
batches afresh, one at a time, so that the host holds a few batches whatever the size of
the set (the evaluator reads the set once per call, training once per validation).

Sources:

* :func:`record_set`: the first ``num_images`` records of a split of prepared records, in
  order, through the grain loader of :mod:`cfm_jax.data.pipeline` (a few batches read ahead).
* :func:`image_folder_set`: a folder of high-res images, each loaded when its batch is read:
  the short side resized to ``image_size`` (PIL bicubic, antialiased), the centre crop, its
  low-res version by the records' down-sampling (``lowres_filter``, ``config.data.lowres_filter``).
* :func:`photo_set`: the validation crops of the bundled photos (``data.name='photos'``),
  each batch drawn when it is read (:meth:`cfm_jax.data.photos.PhotoCrops.batch_at`).

A batch is a dict of float32 NHWC arrays in [-1, 1]: ``image`` [B, H, H, 3] and
``image_lowres`` [B, h, h, 3], plus ``latent`` / ``latent_lowres`` (unscaled) when the
source has the first stage's latents (records; pixel-space photos); the evaluator encodes
the others. Every process reads every global batch, the same arrays, and the evaluator
keeps its own rows. The batch size and the number of images are multiples of the device
count, so every batch splits over the devices.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Callable, Iterator

import numpy as np

from cfm_jax.data import image_io, image_ops, photos, records

log = logging.getLogger(__name__)

READ_AHEAD_BATCHES = 2  # record batches grain's reading threads fetch ahead
READ_THREADS = 4  # grain reading threads (its default, 16, fragments host memory over a long evaluation)


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """A re-iterable evaluation set: ``iter(eval_set)`` reads its global host batches afresh.

    ``read``: returns a new iterator of the batches (``num_images`` images in all, in
    batches of ``batch_size``, the last one possibly smaller)."""

    num_images: int
    batch_size: int
    image_size: int
    description: str
    read: Callable[[], Iterator[dict]]

    @property
    def num_batches(self) -> int:
        return -(-self.num_images // self.batch_size)

    def __iter__(self) -> Iterator[dict]:
        seen = 0
        for batch in self.read():
            seen += len(batch["image"])
            yield batch
        if seen != self.num_images:
            raise RuntimeError(f"{self.description}: read {seen} images, expected {self.num_images} (did the data "
                               "change during the evaluation?).")


def _sizes(what: str, available: int, num_images: int, batch_size: int, n_devices: int) -> tuple[int, int]:
    """``(images, batch size)``: at most ``num_images`` of ``available``, both multiples of
    ``n_devices``."""
    n = min(num_images, available)
    n -= n % n_devices
    if n == 0:
        raise ValueError(f"{what} has {available} usable image(s); the evaluation needs at least {n_devices} (one "
                         "per device).")
    if n < num_images:
        log.warning("Evaluating %d images of %s (%d asked for; %d usable; a multiple of the %d devices).", n, what,
                    num_images, available, n_devices)
    bs = min(batch_size, n)
    return n, max(n_devices, bs - bs % n_devices)


# --------------------------------------------------------------------------- records
def record_set(path: str, split: str, *, num_images: int, batch_size: int, n_devices: int,
               lowres_filter: str | None = None) -> EvalSet:
    """The first ``num_images`` records of ``split`` (fewer if the split is smaller), in order;
    their low-res images use the records' filter (``lowres_filter``, if given, must agree)."""
    from cfm_jax.data import pipeline  # lazy: it imports grain (slow to import); only record sets need it

    available = len(records.data_source(path, split))
    n, bs = _sizes(f"split {split!r} of {path}", available, num_images, batch_size, n_devices)
    image_size = int(records.dataset_metadata(path)["image_size"])
    loader = pipeline.make_record_loader(path, split=split, batch_size=bs, shuffle=False, num_epochs=1,
                                         process_index=0, process_count=1, drop_remainder=False,
                                         read_ahead=READ_AHEAD_BATCHES * bs, read_threads=READ_THREADS,
                                         lowres_filter=lowres_filter)

    def read() -> Iterator[dict]:
        seen = 0
        for batch in loader:  # a fresh iterator of the loader: the records from the first
            take = min(len(batch["image"]), n - seen)  # a multiple of the device count, as n and bs
            yield {k: v[:take] for k, v in batch.items()}
            seen += take
            if seen >= n:
                break

    return EvalSet(num_images=n, batch_size=bs, image_size=image_size, description=f"records {path}, split {split}",
                   read=read)


# --------------------------------------------------------------------------- image folders
def image_folder_set(folder: str, *, image_size: int, lowres_size: int, num_images: int, batch_size: int,
                     n_devices: int, lowres_filter: str = "box") -> EvalSet:
    """The first ``num_images`` usable images of ``folder`` (sorted by path, recursively),
    centre-cropped, their low-res versions made with ``lowres_filter``. Images smaller than
    ``image_size`` or unreadable are skipped with a warning (they have no high-res ground
    truth). Which images are usable is known only after decoding them, so this function
    decodes them once, one at a time and keeping nothing; each pass of the evaluator decodes
    its batches again."""
    image_ops.check_lowres_filter(lowres_filter)
    names, _ = image_io.list_images(folder)
    if not names:
        raise FileNotFoundError(f"No images ({image_io.IMAGE_EXTENSIONS}) in {folder}.")
    usable, skipped = [], []
    for name in names:
        if len(usable) >= num_images:
            break
        loaded = image_io.load_image(os.path.join(folder, name), min_size=image_size)
        if loaded.ok:
            usable.append(name)
        else:
            skipped.append(f"{name} ({loaded.skip_reason}: {loaded.detail})")
    if skipped:
        log.warning("Skipped %d image(s) of %s: %s", len(skipped), folder, "; ".join(skipped[:5]))
    n, bs = _sizes(f"{folder} (images of at least {image_size}² pixels)", len(usable), num_images, batch_size,
                   n_devices)
    usable = usable[:n]

    def read() -> Iterator[dict]:
        for s in range(0, n, bs):
            images = np.stack([_centre_crop(os.path.join(folder, name), image_size) for name in usable[s:s + bs]])
            yield {"image": images, "image_lowres": _downsample(images, lowres_size, lowres_filter)}

    return EvalSet(num_images=n, batch_size=bs, image_size=image_size,
                   description=f"images in {os.path.abspath(folder)} (centre crops)", read=read)


def _centre_crop(path: str, image_size: int) -> np.ndarray:
    """float32 [S, S, 3] in [-1, 1]: the short side resized to S, the centre S² crop."""
    loaded = image_io.load_image(path, min_size=image_size)
    if not loaded.ok:
        raise RuntimeError(f"{path} was readable when the evaluation started and is not any more "
                           f"({loaded.skip_reason}: {loaded.detail}).")
    image = image_ops.resize_short_side(loaded.image, image_size)
    crop = image_ops.make_crops(image, image_size=image_size, crop="center", crops_per_image=1)[0][0]
    return image_ops.to_unit_range(crop)


def _downsample(images: np.ndarray, lowres_size: int, lowres_filter: str) -> np.ndarray:
    return image_ops.downsample_antialiased(images, lowres_size, lowres_filter)


# --------------------------------------------------------------------------- bundled photos
def photo_set(*, image_size: int, lowres_size: int, num_images: int, batch_size: int,
              with_latents: bool = True, lowres_filter: str = "box") -> EvalSet:
    """The validation crops of the bundled photos (``data.name='photos'``): batches of
    ``min(batch_size, num_images)`` crops, ``num_images // that`` of them (at least one).
    ``with_latents``: keep the pixel-space ``latent`` keys (identity first stage only).
    ``lowres_filter``: how the low-res crops are made (``config.data.lowres_filter``). The
    evaluator checks that the batches split over the devices (the trainer builds this set even
    when it never validates)."""
    bs = min(batch_size, num_images)
    crops = photos.PhotoCrops("validation", image_size=image_size, lowres_size=lowres_size, batch_size=bs,
                              seed=12345, lowres_filter=lowres_filter)
    num_batches = max(1, num_images // bs)
    keys = ("image", "image_lowres") + (("latent", "latent_lowres") if with_latents else ())

    def read() -> Iterator[dict]:
        for i in range(num_batches):
            batch = crops.batch_at(i)
            yield {k: batch[k] for k in keys}

    return EvalSet(num_images=num_batches * bs, batch_size=bs, image_size=image_size,
                   description="validation crops of the bundled photos", read=read)


__all__ = ["EvalSet", "image_folder_set", "photo_set", "record_set"]
