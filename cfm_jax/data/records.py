"""TFDS latent records: the on-disk format written by ``python -m cfm_jax.data.prepare``.

A prepared folder ``OUT`` is a TFDS dataset directory (ArrayRecord files plus
``dataset_info.json``, ``features.json``, ``metadata.json``). Read it with::

    import tensorflow_datasets as tfds
    source = tfds.builder_from_directory(OUT).as_data_source(split="train")
    example = source[0]          # dict of numpy arrays, random access, no TensorFlow needed
    tfds.builder_from_directory(OUT).info.metadata   # dataset-level metadata (below)

(:func:`data_source` and :func:`dataset_metadata` are these two calls.) If ``OUT``
is named ``DATA_DIR/<name>/1.0.0`` (e.g. ``--out data/cfm_latents/1.0.0``) the
usual ``tfds.data_source("<name>", data_dir=DATA_DIR, split="train")`` finds it too.

Features of one example (``H`` = image size, ``h = H / f`` with ``f`` the first
stage's downsampling factor, ``C`` its latent channels)::

    image           uint8   [H, H, 3]   the high-res crop
    latent          float32 [h, h, C]   first-stage latent of the crop, *unscaled*
                                        (posterior mode; identity stage: image / 127.5 - 1)
    latent_lowres   float32 [h, h, C]   PSU latent of the low-res image: the crop
                                        antialiased-downsampled to the low-res size,
                                        bilinear back to H x H in pixels, encoded
                                        (identity stage: that up-sampled image)
    moments         float32 [h, h, 2C]  optional (``--with_moments``): posterior mean and
    moments_lowres  float32 [h, h, 2C]  logvar (clipped to [-30, 20] like LDM) of the two,
                                        to sample latents at train time
    file_name       bytes               source file, relative to --src (photos:
                                        ``skimage.data.<name>``), UTF-8
    original_size   int32   [2]         (height, width) of the upright source image
    crop_index      int32               0 .. crops_per_image - 1
    crop_offset     int32   [2]         (top, left) of the crop in the resized image

The low-res image itself is not stored: it is a pure function of ``image``
(``image_ops.make_lowres(image / 127.5 - 1, lowres_size, filter)`` with the filter of
``lowres_method``; ``image_ops.downsample(image / 127.5 - 1, H // lowres_size)`` for ``box``).
Latents are stored unscaled, like the original's records: subtract the ``shift_factor`` and
multiply by the ``scale_factor`` of the metadata (``first_stage.scale_latents``, which
``CFMUpsampler.scaled_latents`` calls).

Dataset-level metadata (``metadata.json``, ``builder.info.metadata``): ``name``,
``image_size``, ``lowres_size``, ``downsample_factor`` (image / low-res), ``lowres_method``
(``box``: block mean at an integer factor; ``box_area``: area-weighted mean at a non-integer one;
``bilinear``: the original's filter; ``pil_box``: an older version's PIL ``BOX``, refused),
``latent_size``, ``latent_channels``, ``scale_factor``, ``shift_factor``, ``first_stage``
(name, kind, path, architecture, a SHA-256 of its weights), ``with_moments``, and per
split the preparation settings and counts (``splits``).

Why not a ``GeneratorBasedBuilder``
-----------------------------------
Its ``download_and_prepare`` writes a whole split in one process run (or needs
Apache Beam to spread it), so it can neither resume after an interruption nor let
several hosts write their own shards. Preparation therefore writes the shards
itself with the same pieces TFDS uses internally -- ``FeaturesDict.encode_example`` and
TFDS's ``ExampleSerializer`` (a ``tf.train.Example`` built from TFDS's own protos, no
TensorFlow; serialised with ``deterministic=True``, see :func:`example_serializer`) and
``ArrayRecordWriter(path, 'group_size:1')`` (TFDS's ArrayRecord options: one record per
group for random access, zstd level 3 by default) -- and then writes the metadata
with ``tfds.core.DatasetInfo``/``SplitInfo``, the mechanism behind
``tfds.folder_dataset.write_metadata`` for data written outside TFDS.

Why uint8 ``Tensor`` and not ``tfds.features.Image``: encoding an ``Image`` feature
(PNG/JPEG) needs TensorFlow, which this project does not install; ``Tensor`` features
are written and read with numpy alone. Arrays use ``encoding='bytes'`` (raw bytes in
one ``bytes_list``): the default encoding would store a uint8 image as an
``int64_list`` of varints, bigger and about a hundred times slower to serialise.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from typing import Any, Callable, Iterable, Mapping

import numpy as np

DATASET_VERSION = "1.0.0"
FILE_FORMAT = "array_record"
# TFDS's own ArrayRecord writer options (file_adapters.ArrayRecordFileAdapter).
ARRAY_RECORD_OPTIONS = "group_size:1"
METADATA_FILES = ("dataset_info.json", "features.json", "metadata.json")


def features_dict(*, image_size: int, latent_size: int, latent_channels: int, with_moments: bool):
    """The ``tfds.features.FeaturesDict`` of one example (see the module docstring)."""
    import tensorflow_datasets as tfds  # lazy: tfds is slow to import; only record I/O needs it

    def array(shape, dtype):
        return tfds.features.Tensor(shape=tuple(shape), dtype=dtype, encoding="bytes")

    latent_shape = (latent_size, latent_size, latent_channels)
    spec = {
        "image": array((image_size, image_size, 3), np.uint8),
        "latent": array(latent_shape, np.float32),
        "latent_lowres": array(latent_shape, np.float32),
        "file_name": tfds.features.Text(),
        "original_size": tfds.features.Tensor(shape=(2,), dtype=np.int32),
        "crop_index": tfds.features.Scalar(dtype=np.int32),
        "crop_offset": tfds.features.Tensor(shape=(2,), dtype=np.int32),
    }
    if with_moments:
        moments_shape = (latent_size, latent_size, 2 * latent_channels)
        spec["moments"] = array(moments_shape, np.float32)
        spec["moments_lowres"] = array(moments_shape, np.float32)
    return tfds.features.FeaturesDict(spec)


def shard_filename(name: str, split: str, shard: int, num_shards: int) -> str:
    """TFDS's default shard file name ``{name}-{split}.array_record-{shard:05d}-of-{num_shards:05d}``."""
    return f"{name}-{split}.{FILE_FORMAT}-{shard:05d}-of-{num_shards:05d}"


def example_serializer(features) -> Callable[[Mapping[str, Any]], bytes]:
    """``example -> bytes``: ``features.serialize_example``, but the same bytes in every process.

    A ``tf.train.Example`` holds its features in a protobuf *map*, and protobuf writes map
    entries in hash-table order unless asked for ``deterministic=True``; TFDS does not ask,
    so two processes (another Python hash seed) wrote the same examples as different bytes
    (same content, other entry order, other compressed size). Parsing does not depend on
    the order: records written either way read back the same."""
    from tensorflow_datasets.core.example_serializer import ExampleSerializer  # lazy: tfds (slow to import)

    to_proto = ExampleSerializer(features.get_serialized_info()).get_tf_example

    def serialize(example: Mapping[str, Any]) -> bytes:
        return to_proto(features.encode_example(example)).SerializeToString(deterministic=True)
    return serialize


def write_shard(path: str, examples: Iterable[Mapping[str, Any]], features, *, tmp_dir: str) -> tuple[int, int]:
    """Writes ``examples`` (dicts matching ``features``) as one ArrayRecord file at ``path``,
    atomically: the records go to a file in ``tmp_dir`` (same file system) that is renamed
    to ``path`` only once complete. Returns ``(num_examples, num_bytes)``."""
    from array_record.python import array_record_module  # local: only writing shards needs the writer

    os.makedirs(tmp_dir, exist_ok=True)
    tmp = os.path.join(tmp_dir, os.path.basename(path) + ".tmp")
    if os.path.exists(tmp):  # left by an interrupted run
        os.remove(tmp)
    writer = array_record_module.ArrayRecordWriter(tmp, ARRAY_RECORD_OPTIONS)
    serialize = example_serializer(features)
    count = 0
    try:
        for example in examples:
            writer.write(serialize(example))
            count += 1
    finally:
        writer.close()
    os.replace(tmp, path)
    return count, os.path.getsize(path)


def write_json_atomic(path: str, obj: Any) -> None:
    """``json.dump`` to a temporary file beside ``path``, then rename: readers and a crash
    never see half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"  # unique per writer, normal permissions
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_dataset_info(out_dir: str, *, name: str, features, splits: Mapping[str, tuple[list[int], int]],
                       metadata: Mapping[str, Any], description: str = "") -> None:
    """Writes ``dataset_info.json``, ``features.json`` and ``metadata.json`` for the shards in
    ``out_dir`` so that ``tfds.builder_from_directory(out_dir)`` reads them.

    ``splits``: ``{split: (shard_lengths, num_bytes)}``; the shards of each split must be
    named by :func:`shard_filename`. The files are written to a temporary folder and
    renamed into place one by one, so concurrent finishers (several hosts) and crashes
    leave either the old or the new version of each file.
    """
    import tensorflow_datasets as tfds  # lazy: tfds is slow to import; only record I/O needs it
    from tensorflow_datasets.core import dataset_info as dataset_info_lib  # lazy: tfds, as above

    identity = dataset_info_lib.DatasetIdentity(name=name, version=tfds.core.Version(DATASET_VERSION),
                                                data_dir=out_dir, module_name="")
    info = tfds.core.DatasetInfo(builder=identity, features=features, description=description,
                                 metadata=tfds.core.MetadataDict(**metadata))
    info.set_file_format(FILE_FORMAT)
    split_infos = []
    for split, (shard_lengths, num_bytes) in sorted(splits.items()):
        template = tfds.core.ShardedFileTemplate(
            data_dir=tfds.core.Path(out_dir), template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
            dataset_name=name, split=split, filetype_suffix=FILE_FORMAT)
        split_infos.append(tfds.core.SplitInfo(name=split, shard_lengths=[int(n) for n in shard_lengths],
                                               num_bytes=int(num_bytes), filename_template=template))
    info.set_splits(tfds.core.SplitDict(split_infos))
    tmp = tempfile.mkdtemp(dir=out_dir, prefix=".dataset_info.")
    try:
        info.write_to_directory(tmp)
        for filename in sorted(os.listdir(tmp)):
            os.replace(os.path.join(tmp, filename), os.path.join(out_dir, filename))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def data_source(out_dir: str, split: str = "train"):
    """Random-access source of a prepared split:
    ``tfds.builder_from_directory(out_dir).as_data_source(split=split)``."""
    import tensorflow_datasets as tfds  # lazy: tfds is slow to import; only record I/O needs it

    return tfds.builder_from_directory(out_dir).as_data_source(split=split)


def dataset_metadata(out_dir: str) -> dict:
    """The dataset-level metadata (``tfds.builder_from_directory(out_dir).info.metadata``)."""
    import tensorflow_datasets as tfds  # lazy: tfds is slow to import; only record I/O needs it

    return dict(tfds.builder_from_directory(out_dir).info.metadata)
