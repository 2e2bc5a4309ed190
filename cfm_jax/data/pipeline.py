"""Training input pipeline over prepared latent records (grain ``DataLoader``).

The records written by ``python -m cfm_jax.data.prepare`` (see :mod:`cfm_jax.data.records`)
are read with random access through ``tfds.builder_from_directory(path).as_data_source``
and turned into batches with the training convention of
:meth:`cfm_jax.data.photos.PhotoCrops.batch_at` -- a dict of float32 NHWC arrays::

    image           [B, H, H, 3]   uint8 record / 127.5 - 1, in [-1, 1]
    image_lowres    [B, h, h, 3]   image_ops.make_lowres(image, h, filter of the records)
    latent          [B, l, l, C]   stored (unscaled) first-stage latent
    latent_lowres   [B, l, l, C]   stored (unscaled) PSU latent of the low-res image
    moments, moments_lowres        only when the records have them (``--with_moments``)

``image_lowres`` is made with the filter the records were prepared with (their
``lowres_method`` metadata, see :func:`records_lowres_filter`), so that it matches
the stored ``latent_lowres``; asking for another filter (``lowres_filter=``) is an error.

Non-array metadata (``file_name``, ``original_size``, ``crop_index``, ``crop_offset``)
is dropped unless ``keep_metadata=True`` (debugging; those keys are then kept as
numpy arrays, ``file_name`` as a unicode string array: keep them out of
:func:`cfm_jax.sharding.shard_batch`).

Usage (one loader per process; each process reads its own disjoint shard of records)::

    loader = make_record_loader(path, batch_size=per_process_batch, seed=0, flip=True)
    it = iter(loader)
    batch = shard_batch(next(it), mesh)     # cfm_jax.sharding: global jax.Arrays sharded on 'data'

Sharding: the ``IndexSampler`` gets ``ShardOptions(process_index, process_count,
drop_remainder=True)`` (defaults ``jax.process_index()`` / ``jax.process_count()``), so
process ``i`` reads records ``i, i + n, i + 2n, ...`` of the (per-epoch shuffled) order,
the same number on every process; the global batch is ``process_count * batch_size``.

Resuming: the iterator's position is grain's ``it.get_state()`` (JSON bytes; ``set_state``
on a fresh iterator restores it). With an orbax ``CheckpointManager`` (as the trainer does)
the iterator is stored as its own item, one file per process::

    import orbax.checkpoint as ocp
    mngr = ocp.CheckpointManager(ckpt_dir, item_names=("state", "data"))
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(train_state),
        data=grain.checkpoint.CheckpointSave(it)))
    ...
    it = iter(loader)
    mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(it)))   # restores ``it`` in place

(``grain.checkpoint.CheckpointSave``/``CheckpointRestore`` are registered with grain's
``PyGrainCheckpointHandler``, so no handler registry is needed; checked with
orbax-checkpoint 0.12.8 in ``tests/test_pipeline.py``.) The restored iterator yields
exactly the batches the uninterrupted one would have, including the random flips:
grain draws each record's random-map RNG from ``(seed, position)``, not from a
running stream. The state includes the number of workers; restore with the same
``worker_count`` settings.

Workers: grain batches *inside* each worker process, so with ``worker_count=W > 1``
output batch ``j * W + w`` is worker ``w``'s ``j``-th batch, made of the records at
sampler positions ``w + W * (j * batch_size + t)``. Every example (values, flip) is the
same as with ``worker_count=0``, but batches are regrouped by that fixed permutation:
changing ``worker_count`` changes the batches (not the data seen per epoch). Under
pytest or scripts not started by ``absl.app.run``, grain's absl flags are marked parsed
(with defaults) when workers are used, because grain's multiprocessing reads them.
"""
from __future__ import annotations

from typing import Any, Mapping

import grain
import jax
import numpy as np
from absl import flags

from cfm_jax.data import records
from cfm_jax.data.image_ops import check_lowres_filter, lowres_filters_agree, make_lowres, to_unit_range

SPATIAL_FLOAT_KEYS = ("latent", "latent_lowres", "moments", "moments_lowres")
METADATA_KEYS = ("file_name", "original_size", "crop_index", "crop_offset")


class RecordToExample(grain.transforms.Map):
    """One record (dict of numpy arrays) -> a float32 example of the batch convention."""

    def __init__(self, lowres_size: int, keep_metadata: bool = False, with_pixels: bool = True,
                 lowres_filter: str = "box"):
        self.lowres_size = int(lowres_size)
        self.lowres_filter = check_lowres_filter(lowres_filter)
        self.keep_metadata = bool(keep_metadata)
        self.with_pixels = bool(with_pixels)

    def map(self, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
        out = {}
        if self.with_pixels:
            image = np.asarray(record["image"])
            if image.dtype != np.uint8:
                raise ValueError(f"record image must be uint8, got {image.dtype}")
            image = to_unit_range(image)
            lowres = make_lowres(image, self.lowres_size, self.lowres_filter)
            out = {"image": image, "image_lowres": np.asarray(lowres, np.float32)}
        for key in SPATIAL_FLOAT_KEYS:
            if key in record:
                out[key] = np.asarray(record[key], np.float32)
        if self.keep_metadata:
            for key in METADATA_KEYS:
                if key in record:
                    value = record[key]
                    if isinstance(value, (bytes, np.bytes_)):
                        value = np.asarray(value.decode("utf-8"))
                    out[key] = np.asarray(value)
        return out


class RandomHorizontalFlip(grain.transforms.RandomMap):
    """Flips all spatial arrays of an example left-right together, with probability 1/2."""

    def random_map(self, example: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        if rng.random() < 0.5:
            example = dict(example)
            for key in ("image", "image_lowres", *SPATIAL_FLOAT_KEYS):
                if key in example:
                    example[key] = np.ascontiguousarray(example[key][:, ::-1])
            example["flipped"] = np.asarray(True)
        else:
            example["flipped"] = np.asarray(False)
        return example


class _DropFlipMarker(grain.transforms.Map):
    def map(self, example):
        example.pop("flipped", None)
        return example


def make_record_loader(path: str, *, split: str = "train", batch_size: int, seed: int = 0, shuffle: bool = True,
                       num_epochs: int | None = None, flip: bool = False, worker_count: int = 0,
                       worker_buffer_size: int = 2, process_index: int | None = None,
                       process_count: int | None = None, drop_remainder: bool = True,
                       keep_metadata: bool = False, keep_flip_marker: bool = False,
                       with_pixels: bool = True, read_ahead: int | None = None,
                       read_threads: int | None = None, lowres_filter: str | None = None) -> grain.DataLoader:
    """A grain ``DataLoader`` of per-process batches from the records of ``split`` in ``path``.

    ``batch_size``: per process. ``num_epochs=None``: repeat forever (shuffled anew each
    epoch when ``shuffle``). ``flip``: random horizontal flip, the same for every array of
    an example (``keep_flip_marker=True`` adds a bool ``flipped`` key, for tests).
    ``worker_count``: grain worker processes (0: in the calling process).
    ``with_pixels=False``: no ``image``/``image_lowres`` keys (the train step needs only the
    latents; at 1024² this skips converting and down-sampling a 3 MiB image per example).
    ``read_ahead``, ``read_threads``: records grain's reading threads fetch ahead and how many
    threads (``None``: grain's defaults, 500 records -- 1.7 GiB of 1024² records -- and 16
    threads; evaluation asks for a few batches and a few threads: each reading thread grows
    its own malloc arena, and 16 of them fragment the host memory of a long evaluation).
    ``lowres_filter``: ``None`` takes the records' filter; a value (``config.data.lowres_filter``)
    must agree with it (:func:`check_lowres_filter_matches`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    process_index = jax.process_index() if process_index is None else int(process_index)
    process_count = jax.process_count() if process_count is None else int(process_count)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count}).")
    meta = records.dataset_metadata(path)
    lowres_size = int(meta["lowres_size"])
    records_filter = records_lowres_filter(meta, path)
    if lowres_filter is not None:
        check_lowres_filter_matches(meta, lowres_filter, path)
    if worker_count > 0:
        _ensure_absl_flags_parsed()
    source = records.data_source(path, split)
    shard = grain.sharding.ShardOptions(shard_index=process_index, shard_count=process_count, drop_remainder=True)
    sampler = grain.samplers.IndexSampler(num_records=len(source), shard_options=shard, shuffle=shuffle,
                                          num_epochs=num_epochs, seed=int(seed))
    operations: list = [RecordToExample(lowres_size, keep_metadata, with_pixels, records_filter)]
    if flip:
        operations.append(RandomHorizontalFlip())
        if not keep_flip_marker:
            operations.append(_DropFlipMarker())
    operations.append(grain.transforms.Batch(batch_size=int(batch_size), drop_remainder=drop_remainder))
    read_options = None
    if read_ahead is not None or read_threads is not None:
        defaults = grain.ReadOptions()
        read_options = grain.ReadOptions(
            num_threads=defaults.num_threads if read_threads is None else max(1, int(read_threads)),
            prefetch_buffer_size=defaults.prefetch_buffer_size if read_ahead is None else max(1, int(read_ahead)))
    return grain.DataLoader(data_source=source, sampler=sampler, operations=operations,
                            worker_count=int(worker_count), worker_buffer_size=int(worker_buffer_size),
                            read_options=read_options)


# records' lowres_method -> the data.lowres_filter that makes the same low-res image today
_RECORD_FILTERS = {"box": "box", "box_area": "box", "bilinear": "bilinear"}


def records_lowres_filter(meta: Mapping[str, Any], path: str = "the records") -> str:
    """The ``data.lowres_filter`` records were prepared with, from their ``lowres_method``
    metadata (``box``/``box_area``: 'box'; ``bilinear``: 'bilinear'; absent: 'box', the only
    filter before the option existed).

    ``pil_box`` (an older version's box filter at a non-integer factor: PIL's ``BOX``, which is
    not an area average) is refused: no filter of this version makes those low-res images, so
    the ``image_lowres`` computed here would not be the one their ``latent_lowres`` came from."""
    method = meta.get("lowres_method", "box")
    if method == "pil_box":
        raise ValueError(
            f"The records at {path} were prepared by an older version with PIL's BOX filter (lowres_method "
            f"'pil_box', {meta.get('image_size')} -> {meta.get('lowres_size')} px), which the 'box' filter no longer "
            "uses at non-integer factors (it is now the exact area average): their latent_lowres do not match "
            "the low-res images made today. Prepare them again into a new folder: python -m cfm_jax.data.prepare "
            f"--src <the same images> --out <new folder> --image_size {meta.get('image_size')} --lowres_size "
            f"{meta.get('lowres_size')} --lowres_filter box (or bilinear) ... with the other settings as before.")
    if method not in _RECORD_FILTERS:
        raise ValueError(f"records lowres_method={method!r} is not one this version knows "
                         f"({sorted(_RECORD_FILTERS)}).")
    return _RECORD_FILTERS[method]


def check_lowres_filter_matches(meta: Mapping[str, Any], lowres_filter: str, path: str = "the records") -> None:
    """Raises a ValueError when ``lowres_filter`` (the config's) differs from the filter of the
    records -- unless the two filters agree at their sizes (factor 1 or 2)."""
    check_lowres_filter(lowres_filter)
    made_with = records_lowres_filter(meta, path)
    if made_with != lowres_filter and not lowres_filters_agree(int(meta["image_size"]), int(meta["lowres_size"])):
        raise ValueError(
            f"data.lowres_filter={lowres_filter!r}, but the records at {path} were prepared with the "
            f"{made_with!r} filter (lowres_method {meta.get('lowres_method', 'box')!r}; {meta['image_size']} -> "
            f"{meta['lowres_size']} px, where the two differ): their latent_lowres were made from the other "
            f"low-res images. Set --config.data.lowres_filter={made_with}, or prepare records with "
            f"python -m cfm_jax.data.prepare --lowres_filter {lowres_filter} ... into another folder.")


def _ensure_absl_flags_parsed() -> None:
    """grain's multiprocessing reads absl flags (``--grain_*``); outside ``absl.app.run``
    (pytest, plain scripts) they are unparsed and reading them raises
    ``UnparsedFlagAccessError``. Marks them parsed with their defaults in that case only."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
