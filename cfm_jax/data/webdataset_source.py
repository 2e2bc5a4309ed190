"""The original's data for record preparation: WebDataset tar shards.

Users of CompVis/fm-boosting keep their data as WebDataset tars (``fmboost/dataloader.py``):
a ``tar_base`` (a folder, or a list of candidate folders of which the first that exists is
used) and ``shards``, one or more brace patterns relative to it, e.g.
``train-{000000..000099}.tar``. Each sample is a group of members ``<key>.<suffix>``::

    <key>.image.png           the high-res image (any format PIL reads; or plain <key>.png / .jpg)
    <key>.latent.npy          its first-stage latent, float [C, h, h] (channels first)
    <key>.latent_lowres.npy   the PSU latent of its low-res version, float [C, h, h]

:func:`open_shards` expands the patterns (``webdataset``'s ``expand_urls``: ``::``-separated
lists, ``$WDS_*`` variables, brace ranges) and :meth:`WebDatasetSource.read` reads one tar
with ``webdataset.tarfile_samples`` into :class:`RawSample` s (bytes, not decoded). Decoding is
done here, per sample, so that a bad sample becomes a skip with a reason instead of an
exception (``prepare`` runs these functions in its loader threads):

* :func:`load_stored` (latents present, ``prepare(..., webdataset_latents='stored')``): the
  image is decoded as the original's loader does (``decode('rgb')``: PIL, ``convert('RGB')``,
  no EXIF rotation, alpha dropped) and must be ``image_size`` square; both latents must be
  floating point of shape ``[C, h, h]`` with ``C``, ``h = image_size / f`` those of the
  configured first stage (``latent_lowres`` is the PSU latent, on the high-res grid, as the
  original's README asks). They are transposed to the records' ``[h, h, C]`` and cast to
  float32 (exact for float16/float32 files), **values unchanged**: the original's trainer
  multiplies stored latents by ``scale_factor`` when it loads a batch
  (``extract_from_batch``), so they are unscaled first-stage latents (posterior mode), which
  is what the records hold too. Nothing is re-encoded.
* :func:`load_image` (image-only tars, ``'encode'``): the image through
  :func:`cfm_jax.data.image_io.load_image`, i.e. prepare's normal path (EXIF, alpha onto
  white, ``min_size``, crops, encoding with the first stage).

Latent files: ``.npy`` (``allow_pickle=False``), ``.npz`` holding one array, ``.ten``/``.tb``
(webdataset's tenbin), ``.pth``/``.pt`` (``torch.load(weights_only=True)``; needs torch).
Other suffixes (e.g. pickles) raise: that is a format decision, not a bad sample.

Skip reasons, besides :data:`cfm_jax.data.image_io.SKIP_REASONS` for the image:
:data:`SKIP_REASONS`. A sample is named ``<tar>/<key>`` (the tar relative to the source's
root) and the detail names the member, e.g. ``skipped (bad_latent): train-000003.tar/000042:
000042.latent.npy: ValueError: ...``. A tar that cannot be read to its end (truncated, bad
header) keeps the samples read before the damage and adds one ``corrupt_shard`` entry named
by the tar.
"""
from __future__ import annotations

import dataclasses
import io
import os
import warnings
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from cfm_jax.data import image_io

IMAGE_SUFFIXES = ("png", "jpg", "jpeg", "webp")
LATENT_SUFFIXES = ("npy", "npz", "ten", "tb", "pth", "pt")
LATENT_FIELDS = ("latent", "latent_lowres")
SKIP_REASONS = ("missing_key", "ambiguous_key", "bad_latent", "wrong_shape", "corrupt_shard")
LATENT_MODES = ("auto", "stored", "encode")
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


# --------------------------------------------------------------------------- shards
def is_webdataset_src(src: str | Sequence[str]) -> bool:
    """Whether ``src`` names tar shards (a list of patterns, or a pattern ending in ``.tar``)."""
    if not isinstance(src, str):
        return True
    if os.path.isdir(os.path.expanduser(src)):
        return False
    return any(p.split("}")[-1].endswith(_TAR_SUFFIXES) for p in src.split("::"))


def choose_tar_base(tar_base: str | Sequence[str] | None) -> str | None:
    """The original's rule: a list of folders gives the first one that exists."""
    if tar_base is None or tar_base == "":
        return None
    candidates = [tar_base] if isinstance(tar_base, str) else list(tar_base)
    for path in candidates:
        if os.path.exists(os.path.expanduser(path)):
            return os.path.abspath(os.path.expanduser(path))
    raise FileNotFoundError(f"None of the tar_base folders exists: {candidates}.")


def expand_shards(patterns: str | Sequence[str], tar_base: str | Sequence[str] | None = None) -> list[str]:
    """Absolute paths of the tars: each pattern expanded by ``webdataset`` (``a::b``, braces),
    relative ones joined to the chosen ``tar_base``; duplicates dropped, order kept. Every tar
    must exist (a wrong pattern is an error, not a skip)."""
    from webdataset.shardlists import expand_urls  # lazy: webdataset imports torch if installed (slow)

    base = choose_tar_base(tar_base)
    paths: list[str] = []
    for pattern in [patterns] if isinstance(patterns, str) else list(patterns):
        for url in expand_urls(pattern):
            if "://" in url or url.startswith("pipe:"):
                raise ValueError(f"{url!r}: only local tar files are supported (mount or copy the shards).")
            url = os.path.expanduser(url)
            path = os.path.abspath(os.path.join(base, url) if base and not os.path.isabs(url) else url)
            if path not in paths:
                paths.append(path)
    if not paths:
        raise ValueError(f"No shards in {patterns!r}.")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(paths)} shards do not exist, e.g. {missing[:3]} "
                                f"(patterns {patterns!r}, tar_base {tar_base!r}).")
    return paths


@dataclasses.dataclass(frozen=True)
class RawSample:
    """One sample of a tar: ``members`` maps the suffix (``image.png``) to the member's bytes."""

    shard: str  # the tar, relative to the source's root
    key: str
    members: dict

    @property
    def name(self) -> str:
        return f"{self.shard}/{self.key}"

    def member(self, suffix: str) -> str:
        return f"{self.key}.{suffix}"

    def find(self, field: str) -> tuple[str | None, tuple[str, str] | None]:
        """``(suffix, None)`` of the member ``<field>.<ext>``, or ``(None, (reason, detail))``
        when there is none or more than one (images: also a plain ``<key>.png`` etc.)."""
        found = sorted(s for s in self.members if s.split(".", 1)[0] == field and "." in s)
        if field == "image" and not found:  # the plain webdataset convention: <key>.png / <key>.jpg
            found = sorted(s for s in self.members if s in IMAGE_SUFFIXES)
        if not found:
            return None, ("missing_key", f"no {field}.* member (has: {', '.join(sorted(self.members)) or 'none'})")
        if len(found) > 1:
            return None, ("ambiguous_key", f"several {field} members: {', '.join(self.member(s) for s in found)}")
        suffix = found[0]
        if field != "image" and suffix.split(".", 1)[1] not in LATENT_SUFFIXES:  # images: whatever PIL reads
            raise ValueError(f"{self.name}: {self.member(suffix)}: unsupported latent format; store latents as "
                             f"one of {', '.join(LATENT_SUFFIXES)}.")
        return suffix, None


@dataclasses.dataclass(frozen=True)
class WebDatasetSource:
    """Tar shards to prepare. ``names``: the tars, relative to ``root`` (one output shard each)."""

    description: str
    names: tuple[str, ...]
    root: str
    ignored: tuple[str, ...] = ()

    def read(self, index: int) -> tuple[list[RawSample], str | None]:
        """The samples of tar ``index`` in file order, and what went wrong reading the tar
        itself (``None``: it was read to its end-of-archive marker)."""
        import webdataset as wds  # lazy: imports torch if installed (slow)

        path = os.path.join(self.root, self.names[index])
        errors: list[str] = []

        def handler(exn: Exception) -> bool:  # webdataset's handler protocol: True = carry on
            errors.append(f"{type(exn).__name__}: {exn.args[0] if exn.args else exn}")
            return True

        samples = []
        for s in wds.tarfile_samples([{"url": path}], handler=handler):
            members = {k: v for k, v in s.items() if not (k.startswith("__") and k.endswith("__"))}
            samples.append(RawSample(shard=self.names[index], key=s["__key__"], members=members))
        if not path.endswith(_TAR_SUFFIXES[1:]) and not _ends_with_tar_trailer(path):
            errors.append("the file does not end with a tar end-of-archive marker (truncated?): samples after "
                          "the last complete one are lost")
        if errors:
            return samples, f"{len(samples)} samples read; " + "; ".join(dict.fromkeys(errors))
        return samples, None

    def detect_latents(self, max_samples: int = 8) -> bool:
        """Whether the first samples of the first tar carry ``latent*`` members."""
        import webdataset as wds  # lazy: imports torch if installed (slow)

        path = os.path.join(self.root, self.names[0])
        for i, s in enumerate(wds.tarfile_samples([{"url": path}], handler=lambda exn: False)):
            if any(k.split(".", 1)[0] in LATENT_FIELDS for k in s):
                return True
            if i + 1 >= max_samples:
                break
        return False


def _ends_with_tar_trailer(path: str) -> bool:
    """A complete (uncompressed) tar ends with two zero blocks and a size in whole blocks."""
    size = os.path.getsize(path)
    if size < 1024 or size % 512:
        return False
    with open(path, "rb") as f:
        f.seek(size - 1024)
        return not any(f.read(1024))


def open_shards(patterns: str | Sequence[str], tar_base: str | Sequence[str] | None = None) -> WebDatasetSource:
    """The source for ``patterns`` (see :func:`expand_shards`). ``root`` is the chosen
    ``tar_base``, else the deepest folder holding every tar; names are relative to it."""
    paths = expand_shards(patterns, tar_base)
    base = choose_tar_base(tar_base)
    root = base if base and all(p.startswith(base + os.sep) for p in paths) else \
        os.path.commonpath([os.path.dirname(p) for p in paths])
    names = tuple(os.path.relpath(p, root).replace(os.sep, "/") for p in paths)
    listed = [patterns] if isinstance(patterns, str) else list(patterns)
    where = (f"tar_base={list(tar_base) if not isinstance(tar_base, str) else tar_base}" if base else root)
    return WebDatasetSource(description=f"webdataset:{where}:{'::'.join(listed)}", names=names, root=root)


# --------------------------------------------------------------------------- samples
@dataclasses.dataclass(frozen=True)
class StoredSample:
    """A sample with stored latents: ``image`` uint8 [H, H, 3], ``latent`` and ``latent_lowres``
    float32 [h, h, C] (unscaled), or ``skip_reason`` and ``detail``."""

    name: str
    image: np.ndarray | None = None
    latent: np.ndarray | None = None
    latent_lowres: np.ndarray | None = None
    skip_reason: str | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.skip_reason is None


def decode_image_like_original(data: bytes) -> np.ndarray:
    """uint8 [H, W, 3] as the original's ``decode('rgb')`` sees it (before its ``/ 255``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return np.ascontiguousarray(np.asarray(img.convert("RGB")))


def decode_latent(data: bytes, ext: str) -> np.ndarray:
    """The array of one latent member (see the module docstring for the formats)."""
    if ext == "npy":
        return np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
    if ext == "npz":
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            if len(z.files) != 1:
                raise ValueError(f".npz holds {len(z.files)} arrays ({z.files}), expected one")
            return z[z.files[0]]
    if ext in ("ten", "tb"):
        from webdataset import tenbin  # lazy: webdataset imports torch if installed (slow)

        arrays = tenbin.decode_buffer(data)
        if len(arrays) != 1:
            raise ValueError(f"tenbin holds {len(arrays)} arrays, expected one")
        return arrays[0]
    try:
        import torch  # lazy: optional (torch-saved latents only) and slow to import
    except ImportError as e:
        raise ImportError(f"Reading .{ext} latents needs torch (pip install torch); or store them as .npy.") from e
    tensor = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"holds a {type(tensor).__name__}, expected a tensor")
    # float32 in torch (exact for half/bfloat16, which numpy cannot hold).
    return tensor.detach().to(torch.float32).numpy() if tensor.is_floating_point() else tensor.numpy()


def _skip(sample: RawSample, reason: str, detail: str) -> StoredSample:
    assert reason in SKIP_REASONS + image_io.SKIP_REASONS, reason
    return StoredSample(name=sample.name, skip_reason=reason, detail=detail)


def load_stored(sample: RawSample, *, image_size: int, latent_size: int, latent_channels: int) -> StoredSample:
    """The image and both stored latents of ``sample``, checked (see the module docstring)."""
    found = {}
    for field in ("image", *LATENT_FIELDS):
        suffix, problem = sample.find(field)
        if problem:
            return _skip(sample, *problem)
        found[field] = suffix

    member = sample.member(found["image"])
    try:
        image = decode_image_like_original(sample.members[found["image"]])
    except UnidentifiedImageError as e:
        return _skip(sample, "not_an_image", f"{member}: {e}")
    except Image.DecompressionBombError as e:
        return _skip(sample, "too_large", f"{member}: {e}")
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        return _skip(sample, "corrupt", f"{member}: {type(e).__name__}: {e}")
    if image.shape != (image_size, image_size, 3):
        return _skip(sample, "wrong_shape", f"{member}: {image.shape[1]}x{image.shape[0]} (WxH), expected "
                     f"{image_size}x{image_size}: images with stored latents are used as they are")

    latents = {}
    want = (latent_channels, latent_size, latent_size)
    for field in LATENT_FIELDS:
        suffix = found[field]
        member = sample.member(suffix)
        try:
            z = np.asarray(decode_latent(sample.members[suffix], suffix.split(".", 1)[1]))
        except ImportError:
            raise
        except Exception as e:  # noqa: BLE001 -- any failure to parse the bytes is a bad sample
            return _skip(sample, "bad_latent", f"{member}: {type(e).__name__}: {e}")
        if not np.issubdtype(z.dtype, np.floating):
            return _skip(sample, "bad_latent", f"{member}: dtype {z.dtype}, expected floating point")
        if z.shape != want:
            return _skip(sample, "wrong_shape", f"{member}: shape {tuple(z.shape)}, expected {want} ([C, h, h], "
                         "channels first as the original stores them; latent_lowres is the PSU latent on the "
                         "high-res grid)")
        if not np.isfinite(z).all():
            return _skip(sample, "bad_latent", f"{member}: non-finite values")
        latents[field] = np.ascontiguousarray(np.transpose(z, (1, 2, 0)), np.float32)  # [C,h,h] -> [h,h,C]
    return StoredSample(name=sample.name, image=image, **latents)


def load_image(sample: RawSample, *, min_size: int, draft_short_side: int | None) -> image_io.LoadedImage:
    """The image of an image-only sample by prepare's policy (:func:`image_io.load_image`)."""
    suffix, problem = sample.find("image")
    if problem:
        return image_io.LoadedImage(skip_reason=problem[0], detail=problem[1])
    loaded = image_io.load_image(io.BytesIO(sample.members[suffix]), min_size=min_size,
                                 draft_short_side=draft_short_side)
    if not loaded.ok:
        return dataclasses.replace(loaded, detail=f"{sample.member(suffix)}: {loaded.detail}")
    return loaded
