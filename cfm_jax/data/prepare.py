"""Prepares TFDS latent records (:mod:`cfm_jax.data.records`) from a folder of photos.

Command line (the paper's data: 1024² crops, 512² low-res, SD VAE latents)::

    python -m cfm_jax.data.prepare --src /data/photos --out /data/cfm_latents/1.0.0 \\
        --image_size 1024 --lowres_size 512 --first_stage_path checkpoints/sd_ae.ckpt \\
        --crop random --crops_per_image 2 --batch_size 8 [--with_moments] \\
        [--num_processes 4 --process_index $HOST_INDEX]
    python -m cfm_jax.data.prepare --src photos --out /tmp/photo_records \\
        --image_size 64 --lowres_size 32                      # bundled photos, pixel space

Read the result with ``tfds.builder_from_directory(OUT).as_data_source(split="train")``.

What happens to one source image
--------------------------------
1. :func:`cfm_jax.data.image_io.load_image`: upright (EXIF), 8-bit RGB, alpha onto white;
   broken, non-image and too small files (short side < ``min_size``, default
   ``short_side``: nothing is up-scaled) are skipped and reported with the reason.
2. The short side is resized to ``short_side`` (default ``image_size``) with PIL's
   antialiased bicubic filter (``short_side=0``: no resizing, crops of native pixels), then,
   with ``max_short_side``, larger images are reduced to that short side;
   ``crops_per_image`` squares of ``image_size`` are cut (``min_scale < 1``: of a region
   zoomed out by a random factor, resampled to ``image_size``):
   ``center`` (one crop) or ``random`` (positions drawn from
   ``SeedSequence([seed, sha256(file name)])``: they do not depend on the other files,
   the shard or the process).
3. ``image_lowres``: antialiased down-sampling to ``lowres_size`` (``--lowres_filter box``, the
   default): the exact area average, ``image_ops.downsample`` when ``image_size / lowres_size`` is
   an integer (bit-exact with the original's bilinear /2), area-weighted otherwise
   (``image_ops.make_lowres``).
4. One jitted function per batch encodes ``latent = encode_unscaled(image)`` and
   ``latent_lowres = encode_unscaled(bilinear_up(image_lowres, image_size))`` (PSU, the same
   as ``CFMUpsampler.make_latents_fn``), plus the posterior moments with ``--with_moments``.
   The identity first stage (``--first_stage_path identity``) gives pixel-space records:
   ``latent = image / 127.5 - 1``. The first stage's weights are an argument of the jitted
   function; batches are padded to ``batch_size`` (one compilation) and split over this
   host's local devices.

Shards, resuming, several processes
-----------------------------------
The sorted file list is cut into shards of ``images_per_shard`` consecutive files;
shard ``k`` belongs to process ``k % num_processes``. Each shard is written to a
temporary file and renamed (TFDS file name ``{name}-{split}.array_record-KKKKK-of-NNNNN``),
then a done-marker ``OUT/_prepare/{split}/shard-KKKKK.json`` (counts, skipped files) is
written. A re-run skips every shard with a valid marker and rewrites the others, so an
interrupted run continues where it stopped and, because every shard is a pure function
of the files and settings, ends with the same bytes as one uninterrupted run (given the
same hardware and ``batch_size``). ``OUT/_prepare/{split}/plan.json`` pins the settings and
the file list; a re-run with different ones fails instead of mixing them.

The process that finds every shard of the split done writes the TFDS metadata
(``dataset_info.json``, ``features.json``, ``metadata.json``) and ``OUT/summary_{split}.json``;
others finish without it (run any one of them again, or call :func:`finalize`, once all
are done). Each process saves its own summary to
``OUT/_prepare/{split}/summary_process{I}_of{P}.json`` and prints it.
Several splits (e.g. ``--split validation`` from another folder) can share one ``OUT``
if their dataset-level settings (sizes, first stage, moments) agree.

The original's WebDataset shards
--------------------------------
``--src`` may also be tar shards as CompVis/fm-boosting keeps them: one or more brace
patterns (``--src '/data/train-{000000..000099}.tar'``, the flag repeated for several), relative
ones joined to ``--tar_base`` (several candidates, ``--tar_base a --tar_base b``: the first that
exists), read by :mod:`cfm_jax.data.webdataset_source`.
With ``latent`` and ``latent_lowres`` members (``--webdataset_latents stored``; ``auto``
looks at the first samples) nothing is re-encoded: the original stores *unscaled* latents
``[C, h, h]`` (its trainer multiplies them by ``scale_factor`` at load time), which is the
records' convention too, so the values are copied, only transposed to ``[h, h, C]``. Their
images must be ``image_size`` square (used as they are, no crop); ``--first_stage_path`` names
the autoencoder that made the latents (its metadata goes into the records; it is not run).
Image-only shards (``encode``) take the normal path above. Each tar becomes one output shard
(resuming and ``--num_processes`` work per tar; ``images_per_shard`` does not apply); a bad
sample is skipped with a reason naming the tar, the sample key and the member.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from cfm_jax import cli
from cfm_jax import first_stage as fs_lib
from cfm_jax.data import image_io, image_ops, photos, records, webdataset_source
from cfm_jax.models.autoencoder import AutoencoderKL

PHOTOS_SOURCE = "photos"
FORMAT_VERSION = 1
_CROP_MODES = ("center", "random")


# --------------------------------------------------------------------------- sources
@dataclasses.dataclass(frozen=True)
class Source:
    """The images to prepare: ``names`` in processing order (file paths relative to
    ``root``, or ``skimage.data.<photo>`` for the bundled photos) and the ignored files."""

    description: str
    names: tuple[str, ...]
    ignored: tuple[str, ...] = ()
    root: str | None = None

    def load(self, index: int, *, min_size: int, draft_short_side: int | None) -> image_io.LoadedImage:
        name = self.names[index]
        if self.root is not None:
            return image_io.load_image(os.path.join(self.root, name), min_size=min_size,
                                       draft_short_side=draft_short_side)
        photo = photos.load_photos(self.description.split(":")[1])[index]
        if min(photo.shape[:2]) < min_size:
            return image_io.LoadedImage(skip_reason="too_small", detail=(
                f"{photo.shape[1]}x{photo.shape[0]} (WxH), short side < min_size={min_size}"))
        return image_io.LoadedImage(image=np.array(photo), original_size=tuple(photo.shape[:2]))


def open_source(src: str | Sequence[str], tar_base: str | Sequence[str] | None = None
                ) -> Source | webdataset_source.WebDatasetSource:
    """``photos`` / ``photos:train`` (the bundled training photos), ``photos:validation``, a
    folder (listed recursively by :func:`cfm_jax.data.image_io.list_images`), or WebDataset tar
    shards (patterns ending in ``.tar``, a list of them, or any ``src`` with ``tar_base``:
    :func:`cfm_jax.data.webdataset_source.open_shards`)."""
    if tar_base or webdataset_source.is_webdataset_src(src):
        return webdataset_source.open_shards(src, tar_base)
    if src == PHOTOS_SOURCE or src.startswith(PHOTOS_SOURCE + ":"):
        split = src.split(":", 1)[1] if ":" in src else "train"
        names = photos.photo_names(split)  # validates the split name
        split = "validation" if names == photos.VALIDATION_PHOTOS else "train"
        return Source(description=f"{PHOTOS_SOURCE}:{split}", names=tuple(f"skimage.data.{n}" for n in names))
    root = os.path.abspath(os.path.expanduser(src))
    names, ignored = image_io.list_images(root)
    return Source(description=root, names=tuple(names), ignored=tuple(ignored), root=root)


# --------------------------------------------------------------------------- first stage
def load_first_stage(path: str = "identity", *, scale_factor: float = -1.0, dtype: str = "float32",
                     tile_size: int = 0, tile_overlap: int = 8):
    """``IdentityFirstStage`` for ``'identity'``, else the autoencoder at ``path`` (any format
    ``first_stage.load_autoencoder`` reads); ``scale_factor=-1``: the checkpoint's
    (``first_stage.make_first_stage``)."""
    name = "identity" if path in ("identity", "", None) else "autoencoder"
    return fs_lib.make_first_stage(name, path or "", scale_factor=scale_factor, dtype=dtype, tile_size=tile_size,
                                   tile_overlap=tile_overlap)


def first_stage_info(fs) -> dict:
    """What identifies a first stage in the records' metadata (incl. a SHA-256 of its weights)."""
    info = {"name": fs.name, "scale_factor": float(fs.scale_factor),
            "shift_factor": float(getattr(fs, "shift_factor", 0.0)),
            "latent_channels": int(fs.latent_channels), "downsample_factor": int(fs.downsample_factor)}
    if isinstance(fs, fs_lib.IdentityFirstStage):
        return {**info, "kind": "identity"}
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(fs.params)[0]:
        a = np.asarray(leaf)
        digest.update(f"{jax.tree_util.keystr(path)}:{a.dtype}:{a.shape};".encode())
        digest.update(np.ascontiguousarray(a).tobytes())
    model = {k: (list(v) if isinstance(v, tuple) else v) for k, v in fs_lib.model_fields(fs.model).items()}
    return {**info, "kind": "autoencoder_kl", "model": model, "dtype": np.dtype(fs.model.dtype).name,
            "tile_size": int(fs.tile_size), "tile_overlap": int(fs.tile_overlap),
            "params_sha256": digest.hexdigest()}


def posterior_moments(fs, images):
    """Posterior ``concat(mean, logvar)`` [B, H/f, W/f, 2C] of images [B, H, W, 3] (jittable;
    tiled like ``encode_unscaled`` when the first stage is)."""
    def moments(x):
        posterior = fs.model.apply({"params": fs.params}, x, method=AutoencoderKL.encode)
        return jnp.concatenate([posterior.mean, posterior.logvar], axis=-1)

    f = fs.downsample_factor
    if fs.tile_size:
        return fs_lib.tiled_map(moments, images, tile=fs.tile_size * f, overlap=fs.tile_overlap * f, scale=1.0 / f)
    return moments(images)


def encode_batch(fs, image, image_lowres, *, with_moments: bool) -> dict:
    """Record latents of a batch (jittable): ``image`` [B, H, H, 3] and ``image_lowres``
    [B, h, h, 3] in [-1, 1] -> ``latent``, ``latent_lowres`` (PSU), optionally ``moments``,
    ``moments_lowres``."""
    up = image_ops.upsample_bilinear(image_lowres, image.shape[1])  # [B, H, H, 3], jnp path
    if not with_moments:
        return {"latent": fs.encode_unscaled(image), "latent_lowres": fs.encode_unscaled(up)}
    m, m_low = posterior_moments(fs, image), posterior_moments(fs, up)
    c = m.shape[-1] // 2
    return {"latent": m[..., :c], "latent_lowres": m_low[..., :c], "moments": m, "moments_lowres": m_low}


# --------------------------------------------------------------------------- crops
def crop_rng(seed: int, name: str) -> np.random.Generator:
    key = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little")
    return np.random.default_rng(np.random.SeedSequence([int(seed), key]))


# --------------------------------------------------------------------------- plan and markers
def _prepare_dir(out: str, split: str) -> str:
    return os.path.join(out, "_prepare", split)


def _marker_path(out: str, split: str, shard: int) -> str:
    return os.path.join(_prepare_dir(out, split), f"shard-{shard:05d}.json")


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _valid_marker(out: str, split: str, shard: int, name: str, num_shards: int) -> dict | None:
    """The done-marker of ``shard`` if it and its (complete) records file exist."""
    marker = _read_json(_marker_path(out, split, shard))
    path = os.path.join(out, records.shard_filename(name, split, shard, num_shards))
    if marker is None or not os.path.isfile(path) or os.path.getsize(path) != marker.get("num_bytes"):
        return None
    return marker


def _diff(a: dict, b: dict) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _check_or_write_plan(out: str, split: str, plan: dict) -> None:
    """Pins the settings and file list of ``split`` in ``OUT/_prepare/{split}/plan.json``; a
    re-run with other settings, or another split with other dataset-level settings, fails."""
    prep = os.path.join(out, "_prepare")
    for other in sorted(os.listdir(prep)) if os.path.isdir(prep) else []:
        existing = _read_json(os.path.join(_prepare_dir(out, other), "plan.json"))
        if existing is None:
            continue
        keys = _diff(existing["dataset"], plan["dataset"])
        if other == split:
            keys += [f"split.{k}" for k in _diff(existing["split"], plan["split"])]
        if keys:
            raise ValueError(
                f"{out} already holds split {other!r} prepared with other settings ({', '.join(keys)} differ"
                f"{'; the file list changed' if 'split.files' in keys else ''}). Use another --out, or delete "
                f"{out} to start over.")
    records.write_json_atomic(os.path.join(_prepare_dir(out, split), "plan.json"), plan)


def _shard_ranges(num_files: int, images_per_shard: int) -> list[range]:
    return [range(s, min(s + images_per_shard, num_files)) for s in range(0, num_files, images_per_shard)]


# --------------------------------------------------------------------------- finalize
def _split_totals(out: str, split: str) -> dict | None:
    """Totals over every shard of ``split`` from the markers, or None while some are missing."""
    plan = _read_json(os.path.join(_prepare_dir(out, split), "plan.json"))
    if plan is None:
        return None
    name, num_shards = plan["dataset"]["name"], plan["split"]["num_shards"]
    markers = [_valid_marker(out, split, k, name, num_shards) for k in range(num_shards)]
    if any(m is None for m in markers):
        return None
    skipped: dict[str, list[str]] = {}
    details = {}
    for m in markers:
        for s in m["skipped"]:
            skipped.setdefault(s["reason"], []).append(s["file"])
            details[s["file"]] = s["detail"]
    return {"plan": plan, "shard_lengths": [m["num_examples"] for m in markers],
            "num_bytes": sum(m["num_bytes"] for m in markers),
            "num_examples": sum(m["num_examples"] for m in markers),
            "images_written": sum(len(m["files"]) for m in markers), "skipped": skipped, "skip_details": details}


def finalize(out: str) -> list[str]:
    """Writes the TFDS metadata for every split of ``out`` whose shards are all done, and
    ``OUT/summary_{split}.json`` for each; returns those splits (empty: nothing complete)."""
    prep = os.path.join(out, "_prepare")
    splits = sorted(os.listdir(prep)) if os.path.isdir(prep) else []
    totals = {s: t for s in splits if (t := _split_totals(out, s)) is not None}
    if not totals:
        return []
    dataset = next(iter(totals.values()))["plan"]["dataset"]
    features = records.features_dict(image_size=dataset["image_size"], latent_size=dataset["latent_size"],
                                     latent_channels=dataset["latent_channels"],
                                     with_moments=dataset["with_moments"])
    split_meta = {}
    for split, t in totals.items():
        settings = {k: v for k, v in t["plan"]["split"].items() if k != "files"}
        split_meta[split] = {**settings, "num_files": len(t["plan"]["split"]["files"]),
                             "num_examples": t["num_examples"], "images_written": t["images_written"],
                             "images_skipped": sum(len(v) for v in t["skipped"].values())}
        records.write_json_atomic(os.path.join(out, f"summary_{split}.json"), {
            "split": split, **split_meta[split], "num_bytes": t["num_bytes"], "skipped": t["skipped"],
            "skip_details": t["skip_details"]})
    metadata = {**dataset, "format_version": FORMAT_VERSION, "splits": split_meta}
    records.write_dataset_info(
        out, name=dataset["name"], features=features, metadata=metadata,
        splits={s: (t["shard_lengths"], t["num_bytes"]) for s, t in totals.items()},
        description=("cfm-jax latent records (cfm_jax/data/records.py): high-res crops, their first-stage "
                     f"latents and the PSU latents of their {dataset['lowres_size']}² versions."))
    return sorted(totals)


# --------------------------------------------------------------------------- prepare
@dataclasses.dataclass
class _Loaded:
    name: str
    crops: list  # [(uint8 [S, S, 3], (top, left))]
    original_size: tuple[int, int] | None
    skip_reason: str | None = None
    detail: str = ""
    latents: dict | None = None  # stored latents of WebDataset shards: latent, latent_lowres [h, h, C]


def _webdataset_latents(source, mode: str) -> str | None:
    """``'stored'`` / ``'encode'`` for tar shards (``'auto'``: stored if the first samples have
    latents), ``None`` for other sources."""
    if not isinstance(source, webdataset_source.WebDatasetSource):
        return None
    if mode not in webdataset_source.LATENT_MODES:
        raise ValueError(f"webdataset_latents={mode!r}; choose one of {webdataset_source.LATENT_MODES}.")
    if mode == "auto":
        return "stored" if source.detect_latents() else "encode"
    return mode


def prepare(src: str | Sequence[str], out: str, *, image_size: int, lowres_size: int, first_stage: Any = "identity",
            split: str = "train", name: str = "cfm_latents", short_side: int | None = None,
            max_short_side: int = 0, min_scale: float = 1.0,
            min_size: int | None = None, crop: str = "center", crops_per_image: int = 1,
            images_per_shard: int = 64, num_processes: int = 1, process_index: int = 0, batch_size: int = 8,
            tar_base: str | Sequence[str] | None = None, webdataset_latents: str = "auto",
            with_moments: bool = False, seed: int = 0, num_workers: int | None = None,
            max_shards: int | None = None, progress: bool = True, lowres_filter: str = "box") -> dict:
    """Prepares this process's shards of ``split`` from ``src`` into ``out``; returns the summary.

    ``src``, ``tar_base``: see :func:`open_source`; ``webdataset_latents``: what to do with tar
    shards (module docstring). ``first_stage``: ``'identity'`` (pixel space), a path for
    :func:`load_first_stage`, or a first-stage object (``IdentityFirstStage`` /
    ``AutoencoderFirstStage``). ``max_shards``: stop after writing that many shards in this call
    (a later call continues). See the module docstring for the rest.
    """
    start = time.time()
    image_size, lowres_size = int(image_size), int(lowres_size)
    short_side = image_size if short_side is None else int(short_side)
    cropping = _Cropping(image_size=image_size, short_side=short_side, max_short_side=int(max_short_side or 0),
                         min_size=(short_side or image_size) if min_size is None else int(min_size), crop=crop,
                         crops_per_image=crops_per_image, min_scale=float(min_scale), seed=int(seed))
    _check_settings(cropping, lowres_size=lowres_size, split=split, name=name, images_per_shard=images_per_shard,
                    batch_size=batch_size, num_processes=num_processes, process_index=process_index)
    source, fs, wds_latents = _open_inputs(src, tar_base, first_stage, cropping, webdataset_latents=webdataset_latents,
                                           with_moments=with_moments)
    stored = wds_latents == "stored"
    f = fs.downsample_factor
    dataset, split_plan, shards = _make_plan(source, fs, cropping, wds_latents, name=name, lowres_size=lowres_size,
                                             lowres_filter=lowres_filter, with_moments=with_moments,
                                             images_per_shard=images_per_shard)
    os.makedirs(out, exist_ok=True)
    _check_or_write_plan(out, split, {"format_version": FORMAT_VERSION, "dataset": dataset, "split": split_plan})

    mine = [k for k in range(len(shards)) if k % num_processes == process_index]
    already = [k for k in mine if _valid_marker(out, split, k, name, len(shards)) is not None]
    todo = [k for k in mine if k not in already]
    if max_shards is not None:
        todo = todo[:max(0, int(max_shards))]

    encoder = _Encoder(fs, image_size=image_size, lowres_size=lowres_size, lowres_filter=lowres_filter,
                       batch_size=batch_size, with_moments=with_moments, stored=stored)
    features = records.features_dict(image_size=image_size, latent_size=image_size // f,
                                     latent_channels=int(fs.latent_channels), with_moments=with_moments)

    def write(shard: int, items: list[_Loaded], examples: list[dict]) -> None:
        _write_shard(out, name, split, shard, len(shards), features, items, examples)

    loader = _ShardLoader(source, shards, cropping, wds_latents=wds_latents, num_workers=num_workers,
                          stored_latents=(image_size // f, int(fs.latent_channels)) if stored else None)
    bar = tqdm(total=None if wds_latents else sum(len(shards[k]) for k in todo), unit="img",
               disable=not progress, dynamic_ncols=True,
               desc=f"prepare {split} [{process_index + 1}/{num_processes}]", smoothing=0.1)
    try:
        written = _load_encode_write(todo, len(shards), loader, encoder, write, bar)
    finally:
        bar.close()
        loader.shutdown()

    done = {k: m for k in mine if (m := _valid_marker(out, split, k, name, len(shards))) is not None}
    finalized = finalize(out) if len(done) == len(mine) else []
    summary = _summary(done, written, source, out=out, name=name, split=split, process_index=process_index,
                       num_processes=num_processes, num_shards=len(shards), mine=mine, already=already,
                       finalized=split in finalized, batch_size=encoder.batch_size, devices=encoder.num_devices,
                       seconds=time.time() - start)
    records.write_json_atomic(
        os.path.join(_prepare_dir(out, split), f"summary_process{process_index}_of{num_processes}.json"), summary)
    return summary


@dataclasses.dataclass(frozen=True)
class _Cropping:
    """How a loaded image becomes crops (module docstring, step 2)."""

    image_size: int
    short_side: int  # 0: native size
    max_short_side: int  # 0: no cap
    min_size: int
    crop: str
    crops_per_image: int
    min_scale: float
    seed: int

    @property
    def draft_short_side(self) -> int | None:
        """The smallest short side the decoder may draft (JPEG) to: nothing below what is used."""
        return self.short_side or self.max_short_side or None

    def crops(self, item_name: str, loaded: image_io.LoadedImage) -> _Loaded:
        if not loaded.ok:
            return _Loaded(item_name, [], None, loaded.skip_reason, loaded.detail)
        resized = image_ops.resize_short_side(loaded.image, self.short_side) if self.short_side else loaded.image
        if self.max_short_side and min(resized.shape[:2]) > self.max_short_side:
            resized = image_ops.resize_short_side(resized, self.max_short_side)
        rng = crop_rng(self.seed, item_name) if self.crop == "random" else None
        return _Loaded(item_name, image_ops.make_crops(resized, image_size=self.image_size, crop=self.crop,
                                                       crops_per_image=self.crops_per_image, rng=rng,
                                                       min_scale=self.min_scale),
                       loaded.original_size)


def _check_settings(c: _Cropping, *, lowres_size: int, split: str, name: str, images_per_shard: int,
                    batch_size: int, num_processes: int, process_index: int) -> None:
    """Rejects sizes and settings that cannot work, naming the argument, before anything is read."""
    image_size, short_side, min_size = c.image_size, c.short_side, c.min_size
    if not 0 < lowres_size <= image_size:
        raise ValueError(f"lowres_size={lowres_size} must be in (0, image_size={image_size}].")
    if c.max_short_side and c.max_short_side < max(image_size, short_side):
        raise ValueError(f"max_short_side={c.max_short_side} must be >= image_size and short_side (or 0: no cap).")
    if short_side and short_side < image_size:
        raise ValueError(f"short_side={short_side} must be >= image_size={image_size} (or 0: native size).")
    if min_size < image_size and not short_side:
        raise ValueError(f"min_size={min_size} < image_size={image_size} with short_side=0 (native size): "
                         "smaller images cannot be cropped; raise min_size or set short_side.")
    if c.crop not in _CROP_MODES:
        raise ValueError(f"crop={c.crop!r}; choose one of {_CROP_MODES}.")
    if c.crops_per_image < 1 or (c.crop == "center" and c.crops_per_image != 1):
        raise ValueError(f"crops_per_image={c.crops_per_image}: use 1 with crop='center' (all centre crops are "
                         "the same), or crop='random'.")
    if not 0.0 < c.min_scale <= 1.0 or (c.min_scale < 1.0 and c.crop != "random"):
        raise ValueError(f"min_scale={c.min_scale} must be in (0, 1], and below 1 only with crop='random'.")
    if not 0 <= process_index < num_processes:
        raise ValueError(f"process_index={process_index} must be in [0, num_processes={num_processes}).")
    if images_per_shard < 1 or batch_size < 1:
        raise ValueError("images_per_shard and batch_size must be >= 1.")
    if not re.fullmatch(r"[a-z0-9_]+", split) or split == "tmp":
        raise ValueError(f"split={split!r}: use lower-case letters, digits and '_' (e.g. 'train', 'validation').")
    if not name.isidentifier() or name != name.lower():
        raise ValueError(f"name={name!r}: TFDS dataset names are lower-case snake_case identifiers.")


def _open_inputs(src, tar_base, first_stage, cropping: _Cropping, *, webdataset_latents: str,
                 with_moments: bool) -> tuple[Source, Any, str | None]:
    """The source, the first stage and what to do with tar shards' latents, rejecting
    combinations that cannot work (after :func:`_check_settings`, before the plan)."""
    source = open_source(src, tar_base)
    if not source.names:
        raise ValueError(f"No images ({', '.join(image_io.IMAGE_EXTENSIONS)}) in {src!r}"
                         f"{f' (ignored: {list(source.ignored)[:10]})' if source.ignored else ''}.")
    fs = load_first_stage(first_stage) if isinstance(first_stage, str) else first_stage
    if with_moments and not hasattr(fs, "params"):
        raise ValueError("with_moments needs an autoencoder first stage (pixel space has no posterior).")
    wds_latents = _webdataset_latents(source, webdataset_latents)
    if wds_latents == "stored" and (with_moments or cropping.crop != "center" or cropping.crops_per_image != 1
                                    or cropping.min_scale != 1.0):
        raise ValueError("The tar shards hold latents, which are written as they are (with their images, "
                         "uncropped): with_moments, random or several crops and min_scale < 1 need the images "
                         "re-encoded; pass webdataset_latents='encode' for that.")
    f = fs.downsample_factor
    if cropping.image_size % f:
        raise ValueError(f"image_size={cropping.image_size} is not divisible by the first stage's factor {f}.")
    return source, fs, wds_latents


def _make_plan(source: Source, fs, cropping: _Cropping, wds_latents: str | None, *, name: str, lowres_size: int,
               lowres_filter: str, with_moments: bool, images_per_shard: int) -> tuple[dict, dict, list[range]]:
    """The plan: the dataset-level settings and this split's file list and shards, pinned in
    _prepare/<split>/plan.json (a re-run with other settings fails instead of mixing them);
    returns ``(dataset, split plan, shards)``."""
    image_size, f = cropping.image_size, fs.downsample_factor
    factor = image_size / lowres_size
    dataset = {"name": name, "image_size": image_size, "lowres_size": lowres_size,
               "downsample_factor": int(factor) if factor.is_integer() else factor,
               "lowres_method": image_ops.lowres_method(lowres_filter, image_size, lowres_size),
               "latent_size": image_size // f, "latent_channels": int(fs.latent_channels),
               "scale_factor": float(fs.scale_factor), "shift_factor": float(getattr(fs, "shift_factor", 0.0)),
               "with_moments": bool(with_moments), "first_stage": first_stage_info(fs)}
    # Tar shards: one output shard per tar (its samples are only known once it is read).
    shards = ([range(k, k + 1) for k in range(len(source.names))] if wds_latents
              else _shard_ranges(len(source.names), images_per_shard))
    split_plan = {"source": source.description, "files": list(source.names), "short_side": cropping.short_side,
                  "max_short_side": cropping.max_short_side, "min_scale": cropping.min_scale,
                  "min_size": cropping.min_size, "crop": cropping.crop, "crops_per_image": cropping.crops_per_image,
                  "seed": cropping.seed, "images_per_shard": images_per_shard, "num_shards": len(shards)}
    if wds_latents:
        split_plan.update(images_per_shard=None, webdataset_latents=wds_latents)
    return dataset, split_plan, shards


class _ShardLoader:
    """Decodes and crops the images of a shard in a pool of threads (tar shards: reads the tar
    in a thread of its own first), so that the next shard loads while this one is encoded."""

    def __init__(self, source, shards: list[range], cropping: _Cropping, *, wds_latents: str | None,
                 num_workers: int | None, stored_latents: tuple[int, int] | None):
        self.source, self.shards, self.cropping = source, shards, cropping
        self.wds_latents = wds_latents
        self.stored_latents = stored_latents  # (latent size, channels) of tars whose latents are copied
        self.loaders = concurrent.futures.ThreadPoolExecutor(num_workers or min(8, os.cpu_count() or 1),
                                                             thread_name_prefix="prepare-load")
        self.reader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="prepare-read")

    def submit(self, shard: int) -> Callable[[], list[_Loaded]]:
        """Starts loading ``shard``; returns a function that waits for its items, in order."""
        if self.wds_latents is None:
            futures = [self.loaders.submit(self._load, i) for i in self.shards[shard]]
            return lambda: [fut.result() for fut in futures]
        tar = self.reader.submit(self._read_tar, shard)
        return lambda: [fut.result() for fut in tar.result()[0]] + tar.result()[1]

    def shutdown(self) -> None:
        self.reader.shutdown(wait=True, cancel_futures=True)  # before loaders: it submits to them
        self.loaders.shutdown(wait=True, cancel_futures=True)

    def _load(self, index: int) -> _Loaded:
        c = self.cropping
        loaded = self.source.load(index, min_size=c.min_size, draft_short_side=c.draft_short_side)
        return c.crops(self.source.names[index], loaded)

    def _read_tar(self, shard: int) -> tuple[list[concurrent.futures.Future], list[_Loaded]]:
        """Reads one tar and hands its samples to the loaders to decode."""
        samples, problem = self.source.read(shard)
        bad_tar = [_Loaded(self.source.names[shard], [], None, "corrupt_shard", problem)] if problem else []
        return [self.loaders.submit(self._load_sample, s) for s in samples], bad_tar

    def _load_sample(self, sample: webdataset_source.RawSample) -> _Loaded:
        c = self.cropping
        if self.stored_latents is None:
            return c.crops(sample.name, webdataset_source.load_image(
                sample, min_size=c.min_size, draft_short_side=c.draft_short_side))
        latent_size, channels = self.stored_latents
        s = webdataset_source.load_stored(sample, image_size=c.image_size, latent_size=latent_size,
                                          latent_channels=channels)
        if not s.ok:
            return _Loaded(s.name, [], None, s.skip_reason, s.detail)
        return _Loaded(s.name, [(s.image, (0, 0))], s.image.shape[:2],
                       latents={"latent": s.latent, "latent_lowres": s.latent_lowres})


class _Encoder:
    """Turns the loaded items of a shard into its examples: one jitted function encodes each
    batch of crops over this host's local devices (module docstring, steps 3-4); tars with
    stored latents are copied as they are."""

    def __init__(self, fs, *, image_size: int, lowres_size: int, lowres_filter: str, batch_size: int,
                 with_moments: bool, stored: bool):
        self.image_size, self.lowres_size, self.lowres_filter = image_size, lowres_size, lowres_filter
        self.stored = stored
        mesh = Mesh(np.asarray(jax.local_devices()), ("data",))
        self.num_devices = mesh.devices.size
        self.batch_size = math.ceil(batch_size / self.num_devices) * self.num_devices  # the same rows per device
        self.rows = NamedSharding(mesh, PartitionSpec("data"))
        # stored latents: the stage is not run
        self.fs = None if stored else jax.device_put(fs, NamedSharding(mesh, PartitionSpec()))
        self.encode = jax.jit(lambda fs, image, lowres: encode_batch(fs, image, lowres, with_moments=with_moments))

    def examples(self, items: list[_Loaded], on_batch: Callable[[int], Any]) -> list[dict]:
        """Examples (metadata + arrays) of the loaded items of one shard, in order; ``on_batch(n)``
        after each batch, ``n`` the items it completed."""
        if self.stored:
            examples = [{"image": item.crops[0][0], **item.latents, "file_name": item.name,
                         "original_size": np.asarray(item.original_size, np.int32), "crop_index": 0,
                         "crop_offset": np.zeros(2, np.int32)} for item in items if item.skip_reason is None]
            on_batch(len(examples))
            return examples
        entries = [(item, c, crop_and_offset) for item in items for c, crop_and_offset in enumerate(item.crops)]
        outputs: list[dict] = []
        pending = None
        for b0 in range(0, len(entries), self.batch_size):
            chunk = entries[b0:b0 + self.batch_size]
            crops = np.zeros((self.batch_size, self.image_size, self.image_size, 3), np.uint8)  # padded: one compilation
            crops[:len(chunk)] = np.stack([e[2][0] for e in chunk])
            image = image_ops.to_unit_range(crops)
            lowres = image_ops.downsample_antialiased(image, self.lowres_size, self.lowres_filter)
            result = self.encode(self.fs, jax.device_put(image, self.rows), jax.device_put(lowres, self.rows))  # async
            if pending is not None:  # the previous batch, read back while this one runs
                outputs.extend(_rows(*pending))
            pending = (result, len(chunk))
            on_batch(sum(1 for item, c, _ in chunk if c == len(item.crops) - 1))
        if pending is not None:
            outputs.extend(_rows(*pending))
        return [{"image": pixels, **arrays, "file_name": item.name,
                 "original_size": np.asarray(item.original_size, np.int32), "crop_index": c,
                 "crop_offset": np.asarray(offset, np.int32)}
                for (item, c, (pixels, offset)), arrays in zip(entries, outputs)]


def _rows(result: dict, n: int) -> list[dict]:
    """The first ``n`` rows of a batch of encoded arrays, one dict per row, on the host."""
    host = {k: np.asarray(v)[:n] for k, v in result.items()}
    return [{k: v[i] for k, v in host.items()} for i in range(n)]


def _write_shard(out: str, name: str, split: str, shard: int, num_shards: int, features, items: list[_Loaded],
                 examples: list[dict]) -> None:
    """Writes one shard (a temporary file, renamed) and then its done-marker."""
    path = os.path.join(out, records.shard_filename(name, split, shard, num_shards))
    count, num_bytes = records.write_shard(path, examples, features, tmp_dir=os.path.join(out, "_prepare", "tmp"))
    records.write_json_atomic(_marker_path(out, split, shard), {
        "shard": shard, "num_examples": count, "num_bytes": num_bytes,
        "files": [i.name for i in items if i.skip_reason is None],
        "skipped": [{"file": i.name, "reason": i.skip_reason, "detail": i.detail}
                    for i in items if i.skip_reason is not None]})


def _load_encode_write(todo: list[int], num_shards: int, loader: _ShardLoader, encoder: _Encoder,
                       write: Callable, bar) -> list[int]:
    """The shards of ``todo`` through three overlapping stages: the next shard loads while this
    one is encoded, and the previous one is written meanwhile (at most one shard waits to be
    written). Returns the shards written."""
    writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="prepare-write")
    written, writing, writing_shard = [], None, -1
    try:
        pending = loader.submit(todo[0]) if todo else None
        for pos, shard in enumerate(todo):
            current = pending
            pending = loader.submit(todo[pos + 1]) if pos + 1 < len(todo) else None
            items = current()
            bar.update(sum(1 for it in items if it.skip_reason is not None))
            examples = encoder.examples(items, bar.update)
            if writing is not None:
                writing.result()
                written.append(writing_shard)
            writing, writing_shard = writer.submit(write, shard, items, examples), shard
            bar.set_postfix(shard=f"{shard + 1}/{num_shards}")
        if writing is not None:
            writing.result()
            written.append(writing_shard)
    finally:
        writer.shutdown(wait=True)
    return written


def _summary(done: dict[int, dict], written: list[int], source, *, out: str, name: str, split: str,
             process_index: int, num_processes: int, num_shards: int, mine: list[int], already: list[int],
             finalized: bool, batch_size: int, devices: int, seconds: float) -> dict:
    """This process's summary, from the done-markers of its shards (``done``)."""
    skipped: dict[str, list[str]] = {}
    details = {}
    for m in done.values():
        for s in m["skipped"]:
            skipped.setdefault(s["reason"], []).append(s["file"])
            details[s["file"]] = s["detail"]
    images_this_run = sum(len(done[k]["files"]) + len(done[k]["skipped"]) for k in written)
    return {
        "out": os.path.abspath(out), "name": name, "split": split, "source": source.description,
        "process_index": process_index, "num_processes": num_processes, "num_files": len(source.names),
        "num_shards": num_shards, "shards_of_this_process": mine, "shards_written": written,
        "shards_already_done": already, "shards_pending": [k for k in mine if k not in done],
        "complete": len(done) == len(mine), "finalized": finalized,
        "examples": sum(m["num_examples"] for m in done.values()),
        "examples_written_this_run": sum(done[k]["num_examples"] for k in written),
        "images_written": sum(len(m["files"]) for m in done.values()),
        "images_skipped": sum(len(v) for v in skipped.values()),
        "skipped": skipped, "skip_details": details, "ignored": list(source.ignored),
        "num_bytes": sum(m["num_bytes"] for m in done.values()),
        "batch_size": batch_size, "devices": devices, "seconds": round(seconds, 3),
        "images_per_second": round(images_this_run / seconds, 3) if seconds > 0 else None,
        "read_with": f"tfds.builder_from_directory({os.path.abspath(out)!r}).as_data_source(split={split!r})",
    }


# --------------------------------------------------------------------------- CLI
PROG = "python -m cfm_jax.data.prepare"
_REQUIRED = {"src": "the images", "out": "the dataset folder", "image_size": "the crop side",
             "lowres_size": "the low-res side"}


def define_flags(fl: flags.FlagValues) -> None:
    """The command line's flags, on ``fl`` (a fresh ``FlagValues`` per :func:`main` call, so that
    main runs in-process as often as a test wants)."""
    def define(kind, name, default, help_, **kw):
        getattr(flags, f"DEFINE_{kind}")(name, default, help=help_, flag_values=fl, **kw)

    define("multi_string", "src", None,
           "folder of images (recursive), photos[:train|:validation], or WebDataset tar shards: one or more "
           "(quoted) patterns such as '/data/train-{000000..000099}.tar' (required)")
    define("multi_string", "tar_base", None,
           "tar shards: folder(s) for relative patterns, the first that exists (the original's tar_base)")
    define("enum", "webdataset_latents", "auto",
           "tar shards: 'stored' writes their latent/latent_lowres as they are (unscaled, [C, h, h]), 'encode' "
           "encodes their images, 'auto': stored if the first samples have latents",
           enum_values=webdataset_source.LATENT_MODES)
    define("string", "out", None, "dataset folder to write (TFDS layout; required)")
    define("string", "split", "train", "split to write, e.g. train or validation (lower-case letters, digits, '_'); "
           "several splits can share one --out")
    define("string", "name", "cfm_latents", "TFDS dataset name (file name prefix)")
    define("integer", "image_size", None,
           "side of the square high-res crops in pixels (1024 for the paper's 64² -> 128² latents); divisible by "
           "the first stage's factor, 8 for the SD VAE (required)")
    define("integer", "lowres_size", None,
           "side of the low-res images in pixels, at most --image_size (512 for the paper; required)")
    define("enum", "lowres_filter", "box", "how the low-res image is made: box (area average) or bilinear (the "
           "original's F.interpolate without antialiasing; the same as box at x2)",
           enum_values=image_ops.LOWRES_FILTERS)
    define("integer", "short_side", None,
           "resize the short side to this before cropping (default image_size; 0: keep the native size)")
    define("integer", "max_short_side", 0,
           "then reduce larger images to this short side (0: no cap; useful with --short_side 0)")
    define("integer", "min_size", None, "skip images with a shorter short side (default short_side: no up-scaling)")
    define("string", "first_stage_path", "identity",
           "'identity' (pixel space) or the autoencoder: converted folder, sd_ae.ckpt, safetensors, diffusers VAE "
           "folder")
    define("float", "scale_factor", -1.0, "latent scale; -1: the checkpoint's")
    define("enum", "first_stage_dtype", "float32", "compute dtype of the autoencoder while encoding",
           enum_values=["float32", "bfloat16"])
    define("integer", "tile_size", 0, "tiled encoding, latent cells (0: off)")
    define("integer", "tile_overlap", 8, "tiled encoding: overlap of the tiles, latent cells")
    define("enum", "crop", "center", "center: one centre crop per image; random: --crops_per_image crops at random "
           "positions", enum_values=list(_CROP_MODES))
    define("integer", "crops_per_image", 1, "crops per image (more than 1 with --crop random)")
    define("float", "min_scale", 1.0, "random crops: zoom out by a log-uniform factor in [min_scale, 1] (1: no zoom)")
    define("integer", "images_per_shard", 64,
           "source images per output shard (the unit of resuming and of splitting over processes)")
    define("integer", "num_processes", 1,
           "processes (or hosts) preparing the split together; shard k is done by process k % N")
    define("integer", "process_index", 0, "this process's index, 0 .. num_processes - 1")
    define("integer", "batch_size", 8, "crops encoded per jitted call (rounded up to a multiple of the local devices)")
    define("bool", "with_moments", False, "also store posterior mean and logvar")
    define("integer", "seed", 0, "random crop positions")
    define("integer", "num_workers", None, "image decoding threads (default min(8, CPUs))")
    define("integer", "max_shards", None, "stop after this many shards (resume later)")
    define("bool", "no_progress", False, "no progress bar")


def parse(argv: Sequence[str]) -> flags.FlagValues:
    """The flags of ``argv`` (``argv[0]`` the program), checked as far as they can be without
    reading a file: a bad flag or value is one line and exit code 2."""
    fl = flags.FlagValues()
    define_flags(fl)
    rest = cli.parse_flags(fl, argv, prog=PROG, usage="--src SRC --out OUT --image_size N --lowres_size N [flags]",
                           doc=__doc__.split("\n\n")[0],
                           epilog="The module docstring (python -c 'import cfm_jax.data.prepare as p; "
                                  "print(p.__doc__)') describes each step, the shards and resuming.")
    cli.reject_positional(rest, PROG, "; give several --src patterns (or --tar_base folders) by repeating the "
                                      "flag: --src a --src b")
    cli.require_flags(fl, _REQUIRED, PROG)
    cli.check_at_least(fl, (("image_size", 1, "the side of the high-res crops in pixels"),
                            ("lowres_size", 1, "the side of the low-res images in pixels"),
                            ("short_side", 0, "the short side images are resized to (0: keep the native size)"),
                            ("max_short_side", 0, "the cap on the short side (0: none)"),
                            ("min_size", 0, "the smallest short side kept"),
                            ("tile_size", 0, "the encoder's tile in latent cells (0: no tiles)"),
                            ("tile_overlap", 0, "the overlap of the encoder's tiles in latent cells"),
                            ("crops_per_image", 1, "the number of crops per image"),
                            ("images_per_shard", 1, "the number of source images per shard"),
                            ("num_processes", 1, "the number of processes preparing the split"),
                            ("process_index", 0, "this process's index"),
                            ("batch_size", 1, "the number of crops per encoder call"),
                            ("num_workers", 1, "the number of image decoding threads"),
                            ("max_shards", 0, "the number of shards to write in this run")))
    return fl


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; ``argv[0]`` the program (default ``sys.argv``). Returns the exit code."""
    args = parse(sys.argv if argv is None else argv)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        cli.fail(f"--out {args.out!r} is a file; --out names the dataset folder to write (created if missing).")
    cli.skip_tpu_probe_without_accelerator()  # before JAX makes a backend
    try:  # a missing folder or file, bad sizes or settings: one line (see prepare's checks)
        fs = load_first_stage(args.first_stage_path, scale_factor=args.scale_factor, dtype=args.first_stage_dtype,
                              tile_size=args.tile_size, tile_overlap=args.tile_overlap)
        summary = prepare(
            args.src[0] if len(args.src) == 1 else args.src, args.out, image_size=args.image_size,
            lowres_size=args.lowres_size, first_stage=fs, tar_base=args.tar_base,
            webdataset_latents=args.webdataset_latents,
            split=args.split, name=args.name, short_side=args.short_side, max_short_side=args.max_short_side,
            min_size=args.min_size, crop=args.crop, min_scale=args.min_scale,
            crops_per_image=args.crops_per_image, images_per_shard=args.images_per_shard,
            num_processes=args.num_processes, process_index=args.process_index, batch_size=args.batch_size,
            with_moments=args.with_moments, seed=args.seed, num_workers=args.num_workers, max_shards=args.max_shards,
            progress=not args.no_progress, lowres_filter=args.lowres_filter)
    except (FileNotFoundError, NotADirectoryError, FileExistsError, PermissionError, ValueError, ImportError) as e:
        cli.fail(str(e))
    short = {k: v for k, v in summary.items() if k not in ("skip_details", "ignored")}
    short["ignored"] = len(summary["ignored"])
    print(json.dumps(short, indent=2))
    for reason, files in sorted(summary["skipped"].items()):
        for file in files:
            print(f"skipped ({reason}): {file}: {summary['skip_details'][file]}", file=sys.stderr)
    status = "finalized: dataset_info.json written" if summary["finalized"] else (
        "this process is done; metadata is written by the process that completes the last shard"
        if summary["complete"] else "incomplete: run again to continue")
    print(f"{summary['examples']} examples from {summary['images_written']} images, "
          f"{summary['images_skipped']} skipped, {summary['seconds']:.1f} s; {status}.", file=sys.stderr)
    print(f"read with: {summary['read_with']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
