"""Reading photos from disk for record preparation, with a fixed policy for bad input.

:func:`list_images` walks a folder recursively and returns the image files in a
deterministic order (sorted by their POSIX path relative to the folder), plus the
files it ignored. :func:`load_image` opens one file and returns a
:class:`LoadedImage`: either an 8-bit RGB array [H, W, 3] or the reason it was
skipped. Nothing raises for bad *input*; only programming errors raise.

Policy
------
Listing
  * extensions ``.jpg .jpeg .png .webp``, case-insensitive; anything else is ignored
    (reported as ``ignored``, not as skipped);
  * hidden files and folders (name starting with ``.``, e.g. macOS ``._x.jpg``
    AppleDouble stubs) are ignored; symlinked folders are not followed.

Skipped, with a reason (:data:`SKIP_REASONS`)
  * ``not_a_file``: not a regular file (a FIFO / named pipe, a socket, a device)
    under an image name. It is opened without blocking and never read: reading a FIFO
    would wait for a writer forever;
  * ``not_an_image``: PIL cannot identify the file (e.g. text named ``.png``);
  * ``corrupt``: the header was read but decoding failed (truncated JPEG/PNG, bad
    data). Truncated files are *not* loaded partially (PIL's
    ``LOAD_TRUNCATED_IMAGES`` stays off): a half-grey photo is a bad target;
  * ``too_large``: PIL's decompression-bomb guard (> 2 x ``Image.MAX_IMAGE_PIXELS``);
  * ``bad_exif``: the EXIF orientation could not be applied (we would not know
    which way is up);
  * ``unsupported_mode``: pixel formats with no clear mapping to 8-bit RGB (e.g.
    float ``F``; cannot come from jpg/png/webp in practice);
  * ``too_small``: the short side (after EXIF orientation) is below ``min_size``.

Converted to 8-bit RGB
  * EXIF orientation is applied first (``PIL.ImageOps.exif_transpose``), so arrays
    are upright and ``original_size`` is the upright size;
  * grayscale ``L`` / bilevel ``1`` / ``YCbCr`` / ``CMYK`` / ``LAB`` / ``HSV``: PIL's
    ``convert('RGB')`` (gray is repeated to three channels);
  * 16-bit (``I;16*``, and ``I`` as PNG stores 16-bit gray in it): ``round(v / 257)``,
    i.e. the full 16-bit range mapped onto 0..255 (``convert`` would clip at 255);
    16-bit RGB PNGs are already reduced to 8 bits by PIL's decoder;
  * anything with alpha (``RGBA``, ``LA``, ``PA``, palette with transparency):
    **composited onto white**. Why white rather than dropping alpha: the colour
    under fully transparent pixels is arbitrary (often black or leftover
    garbage) and was never meant to be seen, while transparent images (product
    shots, cut-outs, logos) are designed to be shown on a light page;
  * animated files: the first frame.

JPEG draft mode: with ``draft_short_side`` a large JPEG is decoded directly at a
reduced scale (1/2, 1/4, 1/8: PIL's DCT scaling) that still leaves the short side
>= ``draft_short_side``; this makes decoding several times faster when the image
is resized down afterwards anyway. ``original_size`` is always the full size.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import stat
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
SKIP_REASONS = ("not_a_file", "not_an_image", "corrupt", "too_large", "bad_exif", "unsupported_mode", "too_small")

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_PLAIN_CONVERT_MODES = ("L", "1", "RGB", "YCbCr", "CMYK", "LAB", "HSV", "RGBX")


@dataclasses.dataclass(frozen=True)
class LoadedImage:
    """Result of :func:`load_image`: ``image`` (uint8 [H, W, 3], upright) and
    ``original_size`` ((height, width) after EXIF orientation, before any draft
    reduction), or ``skip_reason`` (one of :data:`SKIP_REASONS`) and ``detail``."""

    image: np.ndarray | None = None
    original_size: tuple[int, int] | None = None
    skip_reason: str | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.skip_reason is None


def _skip(reason: str, detail: str) -> LoadedImage:
    assert reason in SKIP_REASONS, reason
    return LoadedImage(skip_reason=reason, detail=detail)


def list_images(root: str) -> tuple[list[str], list[str]]:
    """``(images, ignored)``: POSIX paths relative to ``root``, each list sorted.

    ``images`` have an extension of :data:`IMAGE_EXTENSIONS` (any case); ``ignored``
    are the other files and hidden entries. Folders are walked recursively,
    symlinked folders are not followed.
    """
    if not os.path.isdir(root):
        raise NotADirectoryError(f"--src {root!r} is not a folder.")
    images, ignored = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/") + "/"
        hidden_dirs = [d for d in dirnames if d.startswith(".")]
        ignored.extend(rel_dir + d + "/" for d in hidden_dirs)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            rel = rel_dir + name
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                images.append(rel)
            else:
                ignored.append(rel)
    return sorted(images), sorted(ignored)


def to_rgb_uint8(img: Image.Image) -> np.ndarray | None:
    """uint8 [H, W, 3] of an opened, oriented PIL image by the policy above; ``None``
    for a mode without a defined conversion."""
    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES:
        a = np.asarray(img).astype(np.float64)
        gray = np.clip(np.round(a / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    if mode in _PLAIN_CONVERT_MODES:
        return np.asarray(img.convert("RGB"))
    return None


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISDIR, "a folder")):
        if test(mode):
            return kind
    return f"a special file (mode {stat.filemode(mode)})"


def _open_regular_file(path) -> tuple[Any, LoadedImage | None]:
    """``(binary file, None)`` for a regular file (the caller closes it), else ``(None, skip)``.
    Opened with O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer
    (forever); the flag changes nothing for regular files, the only ones read."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:  # e.g. a socket (ENXIO), no permission, gone since the listing
        try:
            st_mode = os.stat(path).st_mode
        except OSError:
            st_mode = None
        if st_mode is not None and not stat.S_ISREG(st_mode):
            return None, _skip("not_a_file", f"{_file_kind(st_mode)}, not a regular file")
        return None, _skip("corrupt", f"cannot open it: {type(e).__name__}: {e}")
    st_mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(st_mode):
        os.close(fd)
        return None, _skip("not_a_file", f"{_file_kind(st_mode)}, not a regular file")
    return os.fdopen(fd, "rb"), None


def load_image(path, *, min_size: int = 0, draft_short_side: int | None = None) -> LoadedImage:
    """Opens ``path`` (a file name, or an open binary file such as ``io.BytesIO``) and applies
    the module's policy (regular files only, EXIF orientation, 8-bit RGB, alpha onto white,
    ``min_size`` on the upright short side)."""
    if isinstance(path, (str, bytes, os.PathLike)):
        file, skipped = _open_regular_file(path)
        if skipped is not None:
            return skipped
    else:
        file = contextlib.nullcontext(path)  # the caller's file: not closed here
    try:
        with file as f, warnings.catch_warnings():
            # Above MAX_IMAGE_PIXELS PIL only warns; above twice that it raises (too_large).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(f) as img:
                width, height = img.size  # full size, before any draft reduction
                if min(width, height) < min_size:  # (the short side does not depend on orientation)
                    return _skip("too_small", f"{width}x{height} (WxH), short side < min_size={min_size}")
                if draft_short_side and img.format == "JPEG":
                    img.draft(img.mode, (int(draft_short_side), int(draft_short_side)))
                img.load()
                try:
                    # Read after load(): a PNG may carry its eXIf chunk after the pixel data.
                    orientation = img.getexif().get(0x0112, 1)
                    upright = ImageOps.exif_transpose(img)
                except Exception as e:  # noqa: BLE001 -- any failure of PIL's EXIF parser
                    return _skip("bad_exif", f"cannot apply the EXIF orientation: {type(e).__name__}: {e}")
                if orientation in (5, 6, 7, 8):  # turned by 90 degrees: the upright size is transposed
                    width, height = height, width
                array = to_rgb_uint8(upright)
                if array is None:
                    return _skip("unsupported_mode", f"PIL mode {upright.mode!r}")
    except UnidentifiedImageError as e:
        return _skip("not_an_image", str(e))
    except Image.DecompressionBombError as e:
        return _skip("too_large", str(e))
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # Truncated or damaged data ("image file is truncated", "broken data stream", ...).
        return _skip("corrupt", f"{type(e).__name__}: {e}")
    return LoadedImage(image=np.ascontiguousarray(array), original_size=(height, width))
