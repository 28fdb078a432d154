"""Image files and image folders, read safely: Pillow decodes only the listed formats, and every
size is checked from the file's header (:data:`~deepdot.io.limits.IMAGE_PIXELS`,
:data:`~deepdot.io.limits.DATA_BYTES`) before a pixel is decoded."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepdot.data import to_nchw_unit
from deepdot.errors import DataError, DeepdotError, describe
from deepdot.io.limits import DATA_BYTES, IMAGE_PIXELS

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".gif", ".tif", ".tiff", ".webp"}
# Pillow picks a decoder by content, not by name: a "photo.png" holding EPS would start
# Ghostscript. Only the formats of IMAGE_SUFFIXES are ever decoded.
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "PPM", "GIF", "TIFF", "WEBP")
FLOAT32 = 4  # bytes per decoded pixel value


@contextmanager
def open_image(path: Path, error: type[DeepdotError] = DataError) -> Iterator[Any]:
    """A Pillow image whose declared size is within IMAGE_PIXELS, to decode inside the ``with``.

    Pillow reads only the header on open, so the size check comes before any pixel is decoded;
    its own decompression-bomb warning is silenced because this check replaces it (its error, at
    twice its limit, still ends as one line). Anything decoding raises becomes one ``error`` line.
    """
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path, formats=IMAGE_FORMATS) as im:
                width, height = im.size
                IMAGE_PIXELS.check(width * height, f"{path}: an image declared as {width}x{height}", error)
                yield im
    except DeepdotError:
        raise
    except Image.DecompressionBombError as exc:
        raise error(f"{path}: image too large to decode safely ({describe(exc)})") from exc
    except Exception as exc:
        raise error(f"{path}: not a readable image ({describe(exc)})") from exc


def _inside(p: Path, root: Path) -> Path:
    """``p`` resolved; a symlink leading out of the data folder is refused (a data folder must not
    make deepdot read files elsewhere, such as /dev/zero or another user's files)."""
    resolved = p.resolve()
    if resolved != root and not resolved.is_relative_to(root):
        raise DataError(
            f"{p}: a symbolic link to {resolved}, outside the data folder; deepdot reads only files inside it"
        )
    return resolved


def _image_header(f: Path, root: Path) -> tuple[tuple[int, int], str]:
    """(height, width) and "L" or "RGB" of one image, from its header alone."""
    if not _inside(f, root).is_file():
        raise DataError(f"{f}: not a regular file")
    with open_image(f) as im:
        return (im.size[1], im.size[0]), "L" if im.mode in ("L", "1", "I;16", "I") else "RGB"


def _decode_image(f: Path, mode: str, size: tuple[int, int]) -> np.ndarray:
    with open_image(f) as im:
        arr = np.asarray(im.convert(mode))
    if arr.shape[:2] != size:
        raise DataError(f"{f}: decodes to {arr.shape[:2]} pixels but its header declares {size}")
    return arr


def read_folder(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (float32 [0, 1], N×C×H×W) and labels of a folder with one subfolder per class:
    numeric folder names ("0", "33") keep their value as the label, otherwise sorted order.

    Every image's header is checked (size, one size for all, the folder's total) before any
    image is decoded; symlinks out of the folder and non-regular files are refused.
    """
    root = path.resolve()
    classes = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{path}: an image folder needs one subfolder per class; none found")
    for c in classes:
        _inside(c, root)
    numeric = all(c.name.isdigit() for c in classes)
    files = [(i, f) for i, c in enumerate(classes) for f in sorted(c.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DataError(f"{path}: no images found in its class subfolders")
    headers = [_image_header(f, root) for _, f in files]
    size = headers[0][0]
    for (_, f), (hw, _) in zip(files, headers, strict=True):
        if hw != size:
            raise DataError(f"{f}: image is {hw} but earlier images are {size}; resize them to one size")
    mode = "L" if all(m == "L" for _, m in headers) else "RGB"
    channels = 1 if mode == "L" else 3
    DATA_BYTES.check(
        len(files) * size[0] * size[1] * channels * (1 + FLOAT32),
        f"{path}: {len(files)} images of {size[0]}x{size[1]}x{channels}",
        DataError,
    )
    stack = np.empty((len(files), *size) + ((3,) if mode == "RGB" else ()), np.uint8)
    for n, (_, f) in enumerate(files):
        stack[n] = _decode_image(f, mode, size)
    nchw = stack[:, None] if mode == "L" else stack.transpose(0, 3, 1, 2)  # explicit: a 3-pixel-high image is not NCHW
    x = to_nchw_unit(nchw, str(path))
    y = torch.tensor([int(classes[i].name) if numeric else i for i, _ in files], dtype=torch.long)
    return x, y
