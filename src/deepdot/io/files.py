"""Small file helpers: JSON results, PNG images, triggers, output folders."""

from __future__ import annotations

import json
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
        probe = p / ".deepdot-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise DeepdotError(f"{p}: cannot write to this output folder ({exc.strerror or exc})") from exc
    return p


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` that replaces it once written (never half a file): write
    to the path this yields; on an error the temporary file is removed and ``path`` is untouched."""
    tmp = path.with_name(f".{path.name}.partial")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | Path, data: Any) -> Path:
    p = Path(path)
    tmp = p.with_suffix(p.suffix + ".tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(p)  # atomic: an interrupted run never leaves half a JSON file
    except OSError as exc:
        raise DeepdotError(f"{p}: cannot write ({exc.strerror or exc})") from exc
    return p


def read_json(path: str | Path) -> Any:
    p = Path(path)
    try:
        return json.loads(p.read_text())
    except FileNotFoundError as exc:
        raise DeepdotError(f"{p}: no such file") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise DeepdotError(f"{p}: not readable JSON ({exc})") from exc


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
        Image.fromarray(to_uint8_image(t)).save(p)
    except OSError as exc:
        raise DeepdotError(f"{p}: cannot write image ({exc})") from exc
    return p


def read_png(path: str | Path, mode: str) -> torch.Tensor:
    """A PNG as a float [0,1] tensor: H×W for mode 'L', C×H×W for 'RGB'."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    try:
        with Image.open(p) as im:
            a = np.asarray(im.convert(mode), dtype=np.float32) / 255.0
    except FileNotFoundError as exc:
        raise DeepdotError(f"{p}: no such file") from exc
    except (UnidentifiedImageError, OSError) as exc:
        raise DeepdotError(f"{p}: not a readable image ({exc})") from exc
    t = torch.from_numpy(a.copy())
    return t if mode == "L" else t.permute(2, 0, 1).contiguous()


def save_trigger(trigger: Trigger, path: str | Path) -> Path:
    """Write a trigger as ``.npz`` (exact) or, for any other path, a folder with mask.png + pattern.png."""
    p = Path(path)
    if p.suffix == ".npz":
        try:
            np.savez(p, mask=trigger.mask.numpy(), pattern=trigger.pattern.numpy())
        except OSError as exc:
            raise DeepdotError(f"{p}: cannot write ({exc.strerror or exc})") from exc
        return p
    ensure_dir(p)
    save_png(p / "mask.png", trigger.mask)
    save_png(p / "pattern.png", trigger.pattern)
    return p


def load_trigger(path: str | Path, image_shape: tuple[int, int, int] | None = None) -> Trigger:
    """Read a trigger: an ``.npz`` with ``mask``/``pattern``; a folder with ``mask.png`` and
    ``pattern.png``; or a ``*mask*.png`` whose pattern is the same name with ``pattern`` (the
    Neural Cleanse reference files, e.g. ``gtsrb_mask.png`` + ``gtsrb_pattern.png``)."""
    p = Path(path).expanduser()
    if p.suffix == ".npz":
        try:
            with np.load(p, allow_pickle=False) as f:
                trigger = Trigger(
                    torch.from_numpy(f["mask"].astype(np.float32)), torch.from_numpy(f["pattern"].astype(np.float32))
                )
        except FileNotFoundError as exc:
            raise DeepdotError(f"{p}: no such file") from exc
        except (OSError, KeyError, ValueError) as exc:
            raise DeepdotError(f"{p}: not a trigger file (needs arrays 'mask' and 'pattern'): {exc}") from exc
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
        trigger = Trigger(mask, pattern)
    if image_shape is not None and tuple(trigger.mask.shape) != tuple(image_shape[1:]):
        raise DeepdotError(f"{p}: trigger is {tuple(trigger.mask.shape)} but the images are {tuple(image_shape[1:])}")
    return trigger
