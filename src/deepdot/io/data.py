"""Reading data sets from disk (and the built-in ``digits`` set) into :class:`ImageData`."""

from __future__ import annotations

import re
import zipfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from deepdot.data import ImageData, to_labels, to_nchw_unit
from deepdot.errors import DataError

BUILTIN = ("digits",)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".gif", ".tif", ".tiff", ".webp"}
_TRACK = re.compile(r"(\d+)_(\d+)\.\w+$")


@lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    # 8×8 is too small for a visible patch trigger: upscale to 16×16.
    x = torch.nn.functional.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False).clamp(0, 1)
    return x.numpy(), d.target.astype(np.int64)


def builtin_digits(split: str = "test", seed: int = 0) -> ImageData:
    """scikit-learn's 1,797 handwritten digits, upscaled to 1×16×16, split 75/25 by label.

    The split is fixed (seed 0) so a model trained on ``train`` is never evaluated on its
    own training images.
    """
    x, y = _digits_arrays()
    full = ImageData(torch.from_numpy(x), torch.from_numpy(y), 10, "digits")
    train, test = full.split(0.25, seed=seed)
    if split not in ("train", "test"):
        raise DataError(f"digits: unknown split {split!r} (train or test)")
    chosen = train if split == "train" else test
    return ImageData(chosen.x, chosen.y, 10, f"digits:{split}")


def _groups_from_filenames(filenames: np.ndarray, y: torch.Tensor) -> torch.Tensor | None:
    """GTSRB-style ``CCCCC/TTTTT_FFFFF.ext`` names -> one group id per (label, track)."""
    tracks = []
    for name in filenames:
        m = _TRACK.search(str(name))
        if m is None:
            return None
        tracks.append(int(m.group(1)))
    t = torch.tensor(tracks, dtype=torch.long)
    return y * 100_000 + t


def _finish(x: torch.Tensor, y: torch.Tensor, source: str, num_classes: int | None, groups=None) -> ImageData:
    if len(x) != len(y):
        raise DataError(f"{source}: {len(x)} images but {len(y)} labels")
    if len(x) == 0:
        raise DataError(f"{source}: the data set is empty")
    k = int(num_classes) if num_classes else int(y.max()) + 1
    if int(y.min()) < 0 or int(y.max()) >= k:
        raise DataError(f"{source}: labels must lie in 0..{k - 1}, found {int(y.min())}..{int(y.max())}")
    return ImageData(x, y, k, source, groups)


def _load_npz(path: Path, split: str, num_classes: int | None) -> ImageData:
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = set(f.files)
            for xk, yk in (
                ("x", "y"),
                (f"x_{split}", f"y_{split}"),
                (f"X_{split}", f"Y_{split}"),
                ("X_test", "Y_test"),
            ):
                if xk in keys and yk in keys:
                    break
            else:
                raise DataError(f"{path}: an .npz data set needs arrays 'x' and 'y'; it has {sorted(keys)}")
            x = to_nchw_unit(f[xk], str(path))
            y = to_labels(f[yk], str(path))
            filenames = f["filenames"] if "filenames" in keys else None
            k = num_classes or (int(f["num_classes"]) if "num_classes" in keys else None)
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc})") from exc
    groups = _groups_from_filenames(filenames, y) if filenames is not None and len(filenames) == len(y) else None
    return _finish(x, y, str(path), k, groups)


def _load_h5(path: Path, split: str, num_classes: int | None) -> ImageData:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            keys = set(f.keys())
            for xk, yk in ((f"X_{split}", f"Y_{split}"), ("X_test", "Y_test"), ("X_train", "Y_train"), ("x", "y")):
                if xk in keys and yk in keys:
                    break
            else:
                raise DataError(
                    f"{path}: expected datasets X_test/Y_test (Neural Cleanse layout); found {sorted(keys)}"
                )
            xa, ya = np.asarray(f[xk]), np.asarray(f[yk])
    except OSError as exc:
        raise DataError(f"{path}: not a readable HDF5 file ({exc})") from exc
    y = to_labels(ya, str(path))
    k = num_classes or (ya.shape[1] if ya.ndim == 2 and ya.shape[1] > 1 else None)
    return _finish(to_nchw_unit(xa, str(path)), y, str(path), k)


def _load_folder(path: Path, num_classes: int | None) -> ImageData:
    from PIL import Image, UnidentifiedImageError

    classes = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{path}: an image folder needs one subfolder per class; none found")
    # numeric folder names ("0", "33") keep their value as the label; otherwise sorted order
    numeric = all(c.name.isdigit() for c in classes)
    images, labels, shape, mode = [], [], None, None
    files = [(i, f) for i, c in enumerate(classes) for f in sorted(c.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    modes = set()
    for _, f in files:
        try:
            with Image.open(f) as im:
                modes.add("L" if im.mode in ("L", "1", "I;16", "I") else "RGB")
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"{f}: not a readable image ({exc})") from exc
    mode = "L" if modes == {"L"} else "RGB"
    for i, f in files:
        with Image.open(f) as im:
            arr = np.asarray(im.convert(mode))
        if shape is None:
            shape = arr.shape
        elif arr.shape != shape:
            raise DataError(
                f"{f}: image is {arr.shape[:2]} but earlier images are {shape[:2]}; resize them to one size"
            )
        images.append(arr)
        labels.append(int(classes[i].name) if numeric else i)
    if not images:
        raise DataError(f"{path}: no images found in its class subfolders")
    x = to_nchw_unit(np.stack(images), str(path))
    y = torch.tensor(labels, dtype=torch.long)
    return _finish(x, y, str(path), num_classes)


def load_data(spec: str | Path, *, split: str = "test", num_classes: int | None = None) -> ImageData:
    """Load images (float32 [0,1], N×C×H×W) and integer labels.

    Args:
        spec: ``digits`` (built-in; ``digits:train`` / ``digits:test`` pick a split), an ``.npz``
            file with ``x`` and ``y`` (NHWC or NCHW, uint8 or float), a Neural Cleanse ``.h5``
            file (``X_test``/``Y_test``, one-hot or integer labels), or a folder with one
            subfolder of images per class.
        split: which split to read where the source has several (built-in sets, ``.h5`` files
            with ``X_train`` and ``X_test``).
        num_classes: the task's label count, when the data may not show every label.

    Raises:
        DataError: with a one-line message naming the source and the problem.
    """
    text = str(spec)
    name, _, sub = text.partition(":")
    if name in BUILTIN and not Path(text).exists():
        return builtin_digits(sub or split)
    path = Path(text).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or folder (built-in data sets: {', '.join(BUILTIN)})")
    if path.is_dir():
        return _load_folder(path, num_classes)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _load_npz(path, split, num_classes)
    if suffix in (".h5", ".hdf5"):
        return _load_h5(path, split, num_classes)
    raise DataError(
        f"{path}: unsupported data format {suffix or '(none)'}; use .npz, .h5 or a folder of class subfolders"
    )
