"""Small file helpers: JSON results, PNG images, triggers, output folders."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepdot.errors import DeepdotError
from deepdot.triggers import Trigger


def ensure_dir(path: str | Path) -> Path:
    """Create an output folder (and parents), or fail with one line saying why."""
    p = Path(path).expanduser()
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=p, prefix=".deepdot-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise DeepdotError(f"{p}: cannot write to this output folder ({exc.strerror or exc})") from exc
    return p


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` that replaces it once written (never half a file): write
    to the path this yields; on an error the temporary file is removed and ``path`` is untouched.

    Every file deepdot writes goes through here. The temporary file is new (created exclusively,
    under a random name) and the rename replaces ``path`` itself, so a symlink planted in the
    output folder is replaced, never followed to overwrite its target.
    """
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | Path, data: Any) -> Path:
    p = Path(path)
    try:
        with replacing(p) as tmp:  # atomic: an interrupted run never leaves half a JSON file
            tmp.write_text(json.dumps(data, indent=2) + "\n")
    except OSError as exc:
        raise DeepdotError(f"{p}: cannot write ({exc.strerror or exc})") from exc
    return p


def read_json(path: str | Path) -> Any:
    p = Path(path)
    try:
        return json.loads(p.read_text())
    except FileNotFoundError as exc:
        raise DeepdotError(f"{p}: no such file") from exc
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON, not UTF-8
        raise DeepdotError(f"{p}: not readable JSON ({str(exc)[:160] or type(exc).__name__})") from exc


def to_uint8_image(t: torch.Tensor) -> np.ndarray:
    """[0, 1] tensor (H×W or C×H×W) -> uint8 array (H×W or H×W×3) for Pillow."""
    a = t.detach().cpu().clamp(0, 1).numpy()
    if a.ndim == 3:
        a = a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)
    return (a * 255.0 + 0.5).astype(np.uint8)


def save_png(path: str | Path, t: torch.Tensor) -> Path:
    from PIL import Image

    p = Path(path)
    try:
        with replacing(p) as tmp:
            Image.fromarray(to_uint8_image(t)).save(tmp, format="PNG")
    except OSError as exc:
        raise DeepdotError(f"{p}: cannot write image ({exc})") from exc
    return p


def read_png(path: str | Path, mode: str) -> torch.Tensor:
    """A PNG as a float [0,1] tensor: H×W for mode 'L', C×H×W for 'RGB'.

    The image's declared size is checked before it is decoded (a tiny file can declare
    20 000 × 20 000 pixels), and anything a corrupt file raises ends as one line.
    """
    from deepdot.io.images import open_image

    p = Path(path)
    if not p.is_file():
        raise DeepdotError(f"{p}: no such file")
    with open_image(p, DeepdotError) as im:
        a = np.asarray(im.convert(mode), dtype=np.float32) / 255.0
    t = torch.from_numpy(a.copy())
    return t if mode == "L" else t.permute(2, 0, 1).contiguous()


def save_trigger(trigger: Trigger, path: str | Path) -> Path:
    """Write a trigger as ``.npz`` (exact) or, for any other path, a folder with mask.png + pattern.png."""
    p = Path(path)
    if p.suffix == ".npz":
        try:
            with replacing(p) as tmp, open(tmp, "wb") as f:
                np.savez(f, mask=trigger.mask.numpy(), pattern=trigger.pattern.numpy())
        except OSError as exc:
            raise DeepdotError(f"{p}: cannot write ({exc.strerror or exc})") from exc
        return p
    if p.is_symlink():  # planted: never write through it to somewhere else
        p.unlink()
    ensure_dir(p)
    save_png(p / "mask.png", trigger.mask)
    save_png(p / "pattern.png", trigger.pattern)
    return p


def load_trigger(path: str | Path, image_shape: tuple[int, int, int] | None = None) -> Trigger:
    """Read a trigger: an ``.npz`` with ``mask``/``pattern``; a folder with ``mask.png`` and
    ``pattern.png``; or a ``*mask*.png`` whose pattern is the same name with ``pattern`` (the
    Neural Cleanse reference files, e.g. ``gtsrb_mask.png`` + ``gtsrb_pattern.png``).

    Trigger files are input like data files: sizes are checked from headers before reading,
    and a corrupt or inconsistent file ends as one line naming it."""
    p = Path(path).expanduser()
    if p.suffix == ".npz":
        if not p.is_file():
            raise DeepdotError(f"{p}: no such file")
        mask, pattern = _read_trigger_npz(p)
    else:
        if p.is_dir():
            mask_path, pattern_path = p / "mask.png", p / "pattern.png"
        elif "mask" in p.name:
            mask_path, pattern_path = p, p.with_name(p.name.replace("mask", "pattern"))
        else:
            raise DeepdotError(f"{p}: a trigger is an .npz, a folder with mask.png + pattern.png, or a *mask*.png")
        channels = image_shape[0] if image_shape else 3
        mask = read_png(mask_path, "L")
        pattern = read_png(pattern_path, "L")[None] if channels == 1 else read_png(pattern_path, "RGB")
    try:
        trigger = Trigger(mask, pattern)
    except DeepdotError as exc:  # the constructor's message does not name the file
        raise DeepdotError(f"{p}: {exc}") from exc
    if image_shape is not None and tuple(trigger.mask.shape) != tuple(image_shape[1:]):
        raise DeepdotError(f"{p}: trigger is {tuple(trigger.mask.shape)} but the images are {tuple(image_shape[1:])}")
    return trigger


def _read_trigger_npz(p: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """``mask`` (H×W) and ``pattern`` (C×H×W) of a trigger ``.npz``: shapes, dtypes and sizes are
    checked from the array headers before any data is decompressed."""
    import math
    import zipfile

    from deepdot.io.data import FLOAT32, NpzArrays, reading
    from deepdot.io.limits import DATA_BYTES, IMAGE_PIXELS

    with reading(p, "trigger .npz file", DeepdotError), zipfile.ZipFile(p) as archive:
        npz = NpzArrays(archive, p)
        if not {"mask", "pattern"} <= npz.keys:
            raise DeepdotError(f"{p}: a trigger file needs arrays 'mask' and 'pattern'; it has {sorted(npz.keys)}")
        (mask_shape, mask_dtype), (pattern_shape, pattern_dtype) = npz.header("mask"), npz.header("pattern")
        if mask_dtype.kind not in "uif" or pattern_dtype.kind not in "uif":
            raise DeepdotError(f"{p}: trigger mask and pattern must be numbers, got {mask_dtype} and {pattern_dtype}")
        if len(mask_shape) != 2 or len(pattern_shape) != 3 or mask_shape != pattern_shape[1:]:
            raise DeepdotError(
                f"{p}: trigger mask must be H×W and pattern C×H×W of one size, got {mask_shape} and {pattern_shape}"
            )
        IMAGE_PIXELS.check(math.prod(mask_shape), f"{p}: a trigger of {mask_shape[0]}x{mask_shape[1]}", DeepdotError)
        raw = math.prod(mask_shape) * mask_dtype.itemsize + math.prod(pattern_shape) * pattern_dtype.itemsize
        values = math.prod(mask_shape) + math.prod(pattern_shape)
        DATA_BYTES.check(raw + values * FLOAT32, f"{p}: a trigger of shape {pattern_shape}", DeepdotError)
        mask, pattern = npz.array("mask"), npz.array("pattern")
    return torch.from_numpy(mask.astype(np.float32)), torch.from_numpy(pattern.astype(np.float32))
