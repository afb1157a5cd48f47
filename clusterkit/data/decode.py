"""Decoding one image file safely: only regular files are opened (a FIFO named like an image
would block forever), the EXIF orientation is applied, 16-bit images are scaled to 8 bits, and
a large photo is shrunk while it is decoded.  The one decoder of training data
(``imagefolder``) and of ``clusterkit predict``."""

from __future__ import annotations

import os
import stat

import numpy as np
from PIL import Image, ImageOps

__all__ = ["NotRegularFileError", "decode_image_file", "file_kind", "fit_square", "special_file_kind", "to_8bit",
           "decode_image", "check_image"]


_SPECIAL_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISDIR, "a folder"),
)


def special_file_kind(path: str | os.PathLike) -> str | None:
    """What ``path`` is when it is not a regular file (``"a FIFO (named pipe)"``, ``"a socket"``,
    ...), else None.  Symbolic links are followed; a path that cannot be examined (missing, a
    dangling link) gives None too, so that opening it reports why.  Only regular files are ever
    opened: opening a FIFO waits for a writer, forever."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    return file_kind(mode)


def file_kind(mode: int) -> str | None:
    """What a file of ``st_mode`` ``mode`` is when it is not a regular file (``"a FIFO (named
    pipe)"``, ``"a folder"``, ...); None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    return next((kind for test, kind in _SPECIAL_KINDS if test(mode)), "a special file")


class NotRegularFileError(OSError):
    """An image path names a FIFO, socket, device or folder: it is never opened."""


# PIL modes of 16-bit (and 32-bit integer) images, whose values run to 65535: PIL's own
# convert("L") would clip them at 255 instead of scaling.
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_8bit(im: Image.Image, mode: str) -> Image.Image:
    """A PIL image as 8-bit ``mode`` ("RGB" or "L"): 16-bit images are scaled to 0..255 (value /
    257, rounded), not clipped; palette images with transparency go through RGBA (alpha is
    dropped)."""
    if im.mode in _WIDE_MODES:
        wide = np.asarray(im).astype(np.int64)
        im = Image.fromarray(np.clip((wide + 128) // 257, 0, 255).astype(np.uint8), "L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    return im if im.mode == mode else im.convert(mode)


def fit_square(im: Image.Image, size: int | None, *, shrink_only: bool = False) -> Image.Image:
    """``im`` resized to a ``size x size`` square (bilinear, with PIL's antialiasing when it
    shrinks); ``size`` None: as it is; ``shrink_only``: only when the image is larger than that."""
    if size is None or im.size == (size, size) or (shrink_only and max(im.size) <= size):
        return im
    return im.resize((size, size), Image.Resampling.BILINEAR)


def decode_image_file(path: str | os.PathLike, mode: str = "RGB", size: int | None = None, *,
                      shrink_only: bool = False) -> np.ndarray:
    """Decode one image file to ``uint8 (H, W, C)`` (C = 3 for "RGB", 1 for "L"): the one decoder
    of training data (``imagefolder``) and of ``predict``.

    Only regular files are opened (:class:`NotRegularFileError` otherwise).  The EXIF orientation
    is applied (a portrait photo stored sideways comes out upright); 16-bit images are scaled, not
    clipped (:func:`to_8bit`).  ``size``: resize to a ``size x size`` square (bilinear, with
    PIL's antialiasing) while decoding, so that a large photo never exists at full size beyond
    the decoder (JPEGs are decoded at a reduced scale, at least ``size``, with ``draft``);
    ``shrink_only``: only when the image is larger than that.  Raises whatever PIL raises for an
    unreadable file.
    """
    kind = special_file_kind(path)
    if kind is not None:
        raise NotRegularFileError(f"not a regular file: it is {kind}")
    with Image.open(path) as im:
        if size is not None:
            im.draft(im.mode, (size, size))  # JPEG: decode at 1/2, 1/4 or 1/8 scale, still >= size
        im = ImageOps.exif_transpose(im)
        im = fit_square(to_8bit(im, mode), size, shrink_only=shrink_only)
        array = np.array(im, dtype=np.uint8)  # a writable copy
    return array[:, :, None] if array.ndim == 2 else array


def decode_image(path: str, size: int) -> tuple[np.ndarray | None, str | None]:
    """Decode one file to ``uint8 (size, size, 3)`` RGB (:func:`decode_image_file`); returns
    ``(array, None)`` or ``(None, error)``."""
    try:
        return decode_image_file(path, "RGB", size), None
    except NotRegularFileError as exc:
        return None, str(exc)
    except Exception as exc:  # noqa: BLE001 - any decoder failure means an unreadable file
        return None, f"{type(exc).__name__}: {exc}"


def check_image(path: str) -> str | None:
    """A cheap header/integrity check without a full decode (of regular files only); the error or None."""
    kind = special_file_kind(path)
    if kind is not None:
        return f"not a regular file: it is {kind}"
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"
    return None
