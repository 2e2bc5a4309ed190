"""Where the trainer's batches come from, for ``config.data``.

``data.name``:

* ``'records'``: prepared TFDS latent records at ``data.path`` (written by
  ``python -m cfm_jax.data.prepare``), read by the grain loader of
  :mod:`cfm_jax.data.pipeline`: shuffled with ``seed``, repeated, optionally flipped,
  each process reading its own shard of the records. The loader's iterator is saved
  in every checkpoint (orbax item ``data``), so a resumed run continues with exactly
  the batches an uninterrupted run would have seen. Validation reads the first
  ``data.num_val_images`` records of split ``data.val_split`` in order, batch by batch
  (:mod:`cfm_jax.data.eval_data`).
  With ``data.prepare_photos=True`` a missing dataset is first prepared from the photos
  bundled with scikit-image (pixel space; see :func:`ensure_photo_records`): this is the
  quick start's path.
* ``'photos'``: random crops of the bundled photos drawn on the fly
  (:class:`cfm_jax.data.photos.PhotoCrops`); the global batch of a step is a pure function
  of ``(seed, step)``, whatever the number of processes (each keeps its own rows), so
  nothing needs saving. With an autoencoder first stage their
  latents are encoded each step (slow; records avoid that).

``data.lowres_filter`` (``'box'`` | ``'bilinear'``, see :func:`cfm_jax.data.image_ops.make_lowres`)
says how the low-res images are made: by the photo crops directly; for records at preparation
(``python -m cfm_jax.data.prepare --lowres_filter``), which they record in their metadata and
:func:`check_records` compares with the config.

A :class:`TrainData` hands out this process's rows of each global batch as numpy
arrays; the trainer turns them into sharded global arrays.
"""
from __future__ import annotations

import abc
import json
import logging
import os

import jax
import numpy as np

from cfm_jax import distributed
from cfm_jax.data import eval_data, image_ops, photos, prepare, records

log = logging.getLogger(__name__)

# The bundled photos as records (quick start). Training crops are native pixels, except that
# the two very large photos (retina, hubble_deep_field: mostly flat background at native
# resolution) are reduced to a 512-px short side; 512 random crops per photo, so that a quick-start
# run never sees a crop twice (docs/quickstart.md). Validation crops are native pixels of the
# four held-out photos, 32 random crops each (records are in file order: use
# data.num_val_images=128 to validate on all four).
PHOTO_RECORDS_VERSION = "v2"  # of the split and crop counts: a change gets a new folder, never stale records
PHOTO_TRAIN_MAX_SHORT_SIDE = 512
PHOTO_TRAIN_CROPS = 512
PHOTO_VAL_CROPS = 32


class TrainData(abc.ABC):
    """This process's training batches, in order (``next_batch``), plus the checkpoint
    arguments that save and restore the position (``None`` when it needs no saving)."""

    has_latents: bool = True  # batches carry ``latent``/``latent_lowres`` already

    @abc.abstractmethod
    def next_batch(self) -> dict[str, np.ndarray]:
        """The next batch (this process's rows)."""

    def seek(self, step: int) -> None:
        """Positions a fresh source at ``step`` (only sources without saved state)."""

    def save_arg(self):
        return None

    def restore_arg(self):
        return None


class PhotoTrainData(TrainData):
    """Every process draws the whole global batch of a step (a pure function of the seed and
    the step, whatever the number of processes) and keeps its own rows."""

    def __init__(self, crops: photos.PhotoCrops, has_latents: bool, process_index: int = 0,
                 process_count: int = 1):
        self.crops = crops
        self.has_latents = has_latents
        self.rows = slice(process_index * crops.batch_size // process_count,
                          (process_index + 1) * crops.batch_size // process_count)
        self.step = 0

    def seek(self, step: int) -> None:
        self.step = int(step)

    def next_batch(self):
        batch = self.crops.batch_at(self.step)
        self.step += 1
        return {k: v[self.rows] for k, v in batch.items()}


class RecordTrainData(TrainData):
    def __init__(self, loader):
        self.loader = loader
        self.iterator = iter(loader)

    def next_batch(self):
        try:
            return next(self.iterator)
        except StopIteration:  # only with a finite num_epochs, which train() never asks for
            raise RuntimeError("The record loader ran out of data.") from None

    def save_arg(self):
        import grain  # lazy: grain is slow to import; only record data needs it
        return grain.checkpoint.CheckpointSave(self.iterator)

    def restore_arg(self):
        import grain  # lazy: slow to import, as in save_arg
        return grain.checkpoint.CheckpointRestore(self.iterator)


# --------------------------------------------------------------------------- records
def lowres_filter_of(config) -> str:
    """``config.data.lowres_filter``, checked."""
    return image_ops.check_lowres_filter(config.data.lowres_filter)


def records_path(config) -> str:
    d = config.data
    if d.path:
        return os.path.abspath(os.path.expanduser(d.path))
    if d.prepare_photos:
        lowres_filter = lowres_filter_of(config)  # box keeps the folder name of older versions
        suffix = "" if lowres_filter == "box" else f"-{lowres_filter}"
        return os.path.abspath(os.path.join("runs", "photo_records",
                                            f"{PHOTO_RECORDS_VERSION}-{d.image_size}x{d.lowres_size}{suffix}"))
    raise ValueError("data.name='records' needs --config.data.path=<folder written by python -m "
                     "cfm_jax.data.prepare>.")


def _has_split(path: str, split: str) -> bool:
    info = os.path.join(path, "dataset_info.json")
    if not os.path.isfile(info):
        return False
    with open(info) as f:
        return any(s.get("name") == split for s in json.load(f).get("splits", []))


def ensure_photo_records(path: str, *, image_size: int, lowres_size: int, train_split: str = "train",
                         val_split: str = "validation", seed: int = 0, progress: bool = True,
                         lowres_filter: str = "box") -> None:
    """Prepares the bundled photos into pixel-space records at ``path`` unless already there.

    Train: ``photos:train`` at native size (short side capped at
    ``max(PHOTO_TRAIN_MAX_SHORT_SIDE, image_size)``), :data:`PHOTO_TRAIN_CROPS` random crops per
    photo; validation: ``photos:validation`` at native size, :data:`PHOTO_VAL_CROPS` random crops
    per photo; low-res images made with ``lowres_filter``. Every process prepares its share
    of the shards (resumable, so an interrupted preparation continues), then process 0 writes the
    dataset metadata.
    """
    todo = [s for s in (train_split, val_split) if s and not _has_split(path, s)]
    if not todo:
        return
    n, i = jax.process_count(), jax.process_index()
    if i == 0:
        log.info("Preparing the bundled photos as records in %s (once; later runs reuse them).", path)
    for split in todo:
        is_val = split == val_split
        prepare.prepare(
            "photos:validation" if is_val else "photos:train", path, split=split, image_size=image_size,
            lowres_size=lowres_size, first_stage="identity",
            short_side=0, max_short_side=0 if is_val else max(PHOTO_TRAIN_MAX_SHORT_SIDE, image_size),
            crop="random",
            crops_per_image=PHOTO_VAL_CROPS if is_val else PHOTO_TRAIN_CROPS, images_per_shard=4,
            num_processes=n, process_index=i, seed=seed, progress=progress and i == 0,
            lowres_filter=lowres_filter)
    if n > 1:
        distributed.barrier("cfm_jax.photo_records.prepared")
        if i == 0:
            prepare.finalize(path)
        distributed.barrier("cfm_jax.photo_records.finalized")
    missing = [s for s in todo if not _has_split(path, s)]
    if missing:
        raise RuntimeError(f"Preparing the photo records in {path} did not complete split(s) {missing}; "
                           "see the summary files in its _prepare folder.")


def check_records(path: str, config, first_stage) -> dict:
    """The dataset metadata at ``path``, after checking it fits ``config`` and the first stage."""
    if not os.path.isfile(os.path.join(path, "dataset_info.json")):
        hint = (" (it was never finalised: re-run the preparation command once all processes are done)"
                if os.path.isdir(os.path.join(path, "_prepare")) else "")
        raise FileNotFoundError(
            f"data.path={path} holds no prepared records{hint}. Prepare them with: python -m "
            f"cfm_jax.data.prepare --src <image folder> --out {path} --image_size {config.data.image_size} "
            f"--lowres_size {config.data.lowres_size} --lowres_filter {lowres_filter_of(config)} "
            "--first_stage_path <VAE checkpoint, or identity>.")
    meta = records.dataset_metadata(path)
    d = config.data
    problems = []
    for key, want in (("image_size", d.image_size), ("lowres_size", d.lowres_size),
                      ("latent_channels", first_stage.latent_channels),
                      ("latent_size", d.image_size // first_stage.downsample_factor)):
        if int(meta[key]) != int(want):
            problems.append(f"{key}: records {meta[key]}, config/first stage {want}")
    rec_kind = meta["first_stage"].get("kind", "")
    cfg_identity = first_stage.name == "identity"
    if (rec_kind == "identity") != cfg_identity:
        problems.append(f"first stage: records made with {rec_kind!r}, config uses {first_stage.name!r}")
    from cfm_jax.data import pipeline  # lazy: it imports grain (slow to import)

    made_with, want = pipeline.records_lowres_filter(meta, path), lowres_filter_of(config)
    if made_with != want and not image_ops.lowres_filters_agree(meta["image_size"], meta["lowres_size"]):
        problems.append(f"lowres_filter: records made with {made_with!r} (lowres_method "
                        f"{meta.get('lowres_method', 'box')!r}), config data.lowres_filter={want!r}")
    if problems:
        raise ValueError(f"The records at {path} do not fit this config: {'; '.join(problems)}. Prepare records "
                         "with matching --image_size/--lowres_size/--lowres_filter/--first_stage_path, or change "
                         "the config.")
    if not cfg_identity and abs(float(meta["scale_factor"]) - float(first_stage.scale_factor)) > 1e-9:
        log.warning("The records were prepared with scale_factor %s; training uses the config's %s (records "
                    "store unscaled latents, so this is only a note).", meta["scale_factor"],
                    first_stage.scale_factor)
    return meta


# --------------------------------------------------------------------------- both
def make_data(config, first_stage, *, n_devices: int | None = None, train: bool = True
              ) -> tuple[TrainData | None, eval_data.EvalSet | None]:
    """``(train_data, validation_set)`` for ``config.data`` (``train=False``: validation only).

    The validation set (:class:`cfm_jax.data.eval_data.EvalSet`, read batch by batch) is
    ``data.num_val_images`` images of the validation split in batches of
    ``min(data.batch_size, data.num_val_images)``; ``None`` when ``data.val_split`` is empty
    and ``train.eval_every`` is 0."""
    d = config.data
    n_devices = jax.device_count() if n_devices is None else n_devices
    n_proc = jax.process_count()
    if d.batch_size % n_proc:
        raise ValueError(f"data.batch_size={d.batch_size} is not divisible by the {n_proc} processes.")
    per_process = d.batch_size // n_proc
    val_bs = min(d.batch_size, d.num_val_images)
    lowres_filter = lowres_filter_of(config)
    if d.name == "photos":
        train_data = None
        if train:
            crops = photos.PhotoCrops("train", image_size=d.image_size, lowres_size=d.lowres_size,
                                      batch_size=d.batch_size, seed=config.seed, lowres_filter=lowres_filter)
            train_data = PhotoTrainData(crops, has_latents=first_stage.name == "identity",
                                        process_index=jax.process_index(), process_count=n_proc)
        val = eval_data.photo_set(image_size=d.image_size, lowres_size=d.lowres_size, num_images=d.num_val_images,
                                  batch_size=val_bs, with_latents=first_stage.name == "identity",
                                  lowres_filter=lowres_filter)
        return train_data, val
    if d.name != "records":
        raise ValueError(f"data.name={d.name!r}: choose 'records' (prepared latent records at data.path) or "
                         "'photos' (crops of the bundled photos drawn on the fly).")
    path = records_path(config)
    if d.prepare_photos:
        if first_stage.name != "identity":
            raise ValueError("data.prepare_photos prepares pixel-space records: it needs first_stage.name="
                             "'identity'. For latent records run python -m cfm_jax.data.prepare with your VAE.")
        ensure_photo_records(path, image_size=d.image_size, lowres_size=d.lowres_size,
                             train_split=d.train_split, val_split=d.val_split, seed=config.seed,
                             progress=config.logging.progress_bar, lowres_filter=lowres_filter)
    check_records(path, config, first_stage)
    from cfm_jax.data import pipeline  # lazy: it imports grain (slow to import)

    train_data = None
    if train:
        _check_split(path, d.train_split)
        loader = pipeline.make_record_loader(
            path, split=d.train_split, batch_size=per_process, seed=config.seed, shuffle=True,
            num_epochs=None, flip=d.flip, worker_count=d.worker_count, worker_buffer_size=d.worker_buffer_size,
            with_pixels=False, lowres_filter=lowres_filter)  # the train step reads only the latents
        train_data = RecordTrainData(loader)
    val = None
    if d.val_split:
        _check_split(path, d.val_split)
        val = eval_data.record_set(path, d.val_split, num_images=d.num_val_images, batch_size=val_bs,
                                   n_devices=n_devices, lowres_filter=lowres_filter)
    elif config.train.eval_every > 0 or not train:
        raise ValueError("data.val_split is empty: there is nothing to validate on. Prepare a validation split "
                         "(python -m cfm_jax.data.prepare --split validation ...) or set train.eval_every=0.")
    return train_data, val


def _check_split(path: str, split: str) -> None:
    if not _has_split(path, split):
        raise ValueError(f"The records at {path} have no split {split!r}; prepare it with python -m "
                         f"cfm_jax.data.prepare --split {split} --out {path} ..., or set data.train_split/"
                         "data.val_split.")


__all__ = ["PhotoTrainData", "RecordTrainData", "TrainData", "check_records", "ensure_photo_records",
           "lowres_filter_of", "make_data", "records_path"]
