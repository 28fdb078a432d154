"""Reading data sets from disk (and the built-in ``digits`` set) into :class:`ImageData`.

Data files are hostile input: every reader checks what a file *declares* (array headers, HDF5
data set shapes and storage, image sizes) against :mod:`deepdot.io.limits` before it reads any
pixel, never follows a file to another file, and turns anything a corrupt file raises into one
:class:`DataError` line naming the file.
"""

from __future__ import annotations

import math
import re
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepdot.data import ImageData, to_labels, to_nchw_unit
from deepdot.errors import DataError, DeepdotError, describe
from deepdot.io.images import FLOAT32, read_folder
from deepdot.io.limits import DATA_BYTES

BUILTIN = ("digits",)
MAX_CLASSES = 100_000
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
    if k > MAX_CLASSES:  # a model is built with one output per class: a stray label must not size it
        raise DataError(f"{source}: {k:,} classes, more than the {MAX_CLASSES:,} deepdot accepts")
    if int(y.min()) < 0 or int(y.max()) >= k:
        raise DataError(f"{source}: labels must lie in 0..{k - 1}, found {int(y.min())}..{int(y.max())}")
    return ImageData(x, y, k, source, groups)


@contextmanager
def reading(source: Path | str, what: str, error: type[DeepdotError] = DataError) -> Iterator[None]:
    """Turn anything a corrupt or truncated file raises while it is parsed into one ``error`` line.

    Zip, npy, HDF5 and image parsers raise a zoo of exceptions on bad bytes (BadZipFile,
    EOFError, zlib.error, struct.error, KeyError, NotImplementedError, MemoryError …); a list of
    them invites a traceback for the one left out, so everything except deepdot's own errors
    becomes "not a readable …". KeyboardInterrupt and SystemExit are not ``Exception`` and pass.
    """
    try:
        yield
    except DeepdotError:
        raise
    except Exception as exc:
        raise error(f"{source}: not a readable {what} ({describe(exc)})") from exc


def _count(shape: tuple[int, ...]) -> int:
    return math.prod(int(d) for d in shape)


class NpzArrays:
    """The ``.npy`` members of an ``.npz`` archive, read one at a time so that each member's header
    (shape and dtype) can be checked before its data is decompressed: a 200 KB archive can hold
    gigabytes of zeros. Never unpickles; refuses object and structured arrays."""

    def __init__(self, archive: zipfile.ZipFile, source: str | Path) -> None:
        self.archive, self.source = archive, str(source)
        self.keys = {name[:-4] for name in archive.namelist() if name.endswith(".npy")}

    def header(self, key: str) -> tuple[tuple[int, ...], np.dtype]:
        """Shape and dtype of member ``key`` from its ``.npy`` header alone."""
        fmt = np.lib.format
        with self.archive.open(key + ".npy") as fh:
            version = fmt.read_magic(fh)
            if version not in ((1, 0), (2, 0), (3, 0)):
                raise DataError(f"{self.source}: array {key!r} has unknown .npy format version {version}")
            # version 3.0 differs from 2.0 only in the text encoding of structured field names
            read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, _, dtype = read(fh)
        if dtype.hasobject:
            raise DataError(
                f"{self.source}: array {key!r} holds Python objects; deepdot reads plain number arrays only"
            )
        if dtype.fields is not None or dtype.subdtype is not None:
            raise DataError(f"{self.source}: array {key!r} has structured dtype {dtype}; expected plain numbers")
        if any(int(d) < 0 for d in shape):
            raise DataError(f"{self.source}: array {key!r} declares a negative shape {shape}")
        return tuple(int(d) for d in shape), dtype

    def array(self, key: str) -> np.ndarray:
        """Member ``key``'s data; call after :meth:`header` has passed the size checks."""
        with self.archive.open(key + ".npy") as fh:
            return np.lib.format.read_array(fh, allow_pickle=False)


def _pick(keys: set[str], pairs: tuple[tuple[str, str], ...]) -> tuple[str, str] | None:
    return next(((xk, yk) for xk, yk in pairs if xk in keys and yk in keys), None)


def _check_kind(source: str | Path, what: str, dtype: np.dtype, kinds: str) -> None:
    if dtype.kind not in kinds:
        raise DataError(f"{source}: {what} have unsupported dtype {dtype}")


def _check_npz(path: Path, headers: dict[str, tuple[tuple[int, ...], np.dtype]], xk: str, yk: str) -> None:
    """Dtypes and the decoded size (raw arrays plus float32 images and int64 labels) from headers."""
    (x_shape, x_dtype), (y_shape, y_dtype) = headers[xk], headers[yk]
    _check_kind(path, f"images {xk!r}", x_dtype, "uif")
    _check_kind(path, f"labels {yk!r}", y_dtype, "uif")
    if "filenames" in headers:
        _check_kind(path, "file names 'filenames'", headers["filenames"][1], "US")
    if "num_classes" in headers:
        _check_kind(path, "class counts 'num_classes'", headers["num_classes"][1], "ui")
        if _count(headers["num_classes"][0]) != 1:
            raise DataError(f"{path}: 'num_classes' must be a single number, got shape {headers['num_classes'][0]}")
    images = _count(x_shape) * (x_dtype.itemsize + FLOAT32)
    DATA_BYTES.check(images, f"{path}: images of shape {x_shape}", DataError)
    rest = sum(_count(shape) * dtype.itemsize for key, (shape, dtype) in headers.items() if key != xk)
    DATA_BYTES.check(images + rest + 8 * _count(y_shape), f"{path}: arrays {', '.join(headers)}", DataError)


_NPZ_PAIRS = ("x", "y"), ("x_{split}", "y_{split}"), ("X_{split}", "Y_{split}"), ("X_test", "Y_test")


def _load_npz(path: Path, split: str, num_classes: int | None) -> ImageData:
    with zipfile.ZipFile(path) as archive:
        npz = NpzArrays(archive, path)
        pair = _pick(npz.keys, tuple((a.format(split=split), b.format(split=split)) for a, b in _NPZ_PAIRS))
        if pair is None:
            raise DataError(f"{path}: an .npz data set needs arrays 'x' and 'y'; it has {sorted(npz.keys)}")
        xk, yk = pair
        wanted = [xk, yk] + [k for k in ("filenames", "num_classes") if k in npz.keys]
        _check_npz(path, {k: npz.header(k) for k in wanted}, xk, yk)
        arrays = {k: npz.array(k) for k in wanted}
    x = to_nchw_unit(arrays.pop(xk), str(path))  # pop: the raw images are freed once converted
    y = to_labels(arrays.pop(yk), str(path))
    k = num_classes
    if not k and "num_classes" in arrays:
        k = int(arrays["num_classes"].reshape(-1)[0])
        if k < 1:
            raise DataError(f"{path}: 'num_classes' must be positive, got {k}")
    filenames = arrays.get("filenames")
    groups = _groups_from_filenames(filenames, y) if filenames is not None and len(filenames) == len(y) else None
    return _finish(x, y, str(path), k, groups)


def _h5_follow_soft_link(f: Any, name: str, target: str, path: Path) -> None:
    """Refuse a soft link unless every step of its target is an object stored in this file.

    HDF5 resolves each step of a path itself; a step that is an external link would open
    another file, so the steps are checked one by one from the root before anything is opened.
    Relative targets resolve from the root, where every name read here lives.
    """
    import h5py

    where = ""
    for part in (p for p in target.split("/") if p):
        where += "/" + part
        if not isinstance(f.get(where, getlink=True), h5py.HardLink):
            raise DataError(
                f"{path}: {name!r} is a link to {target!r}, which does not lead directly to data stored in this file"
            )


def _h5_dataset(f: Any, name: str, path: Path) -> Any:
    """The data set ``name``, refusing whatever would make HDF5 open or read another file:
    external links, external raw storage and virtual data sets (as ONNX external data is refused)."""
    import h5py

    link = f.get(name, getlink=True)
    if isinstance(link, h5py.ExternalLink):
        raise DataError(
            f"{path}: {name!r} is a link into another file ({link.filename!r}); deepdot reads self-contained HDF5 files only"
        )
    if isinstance(link, h5py.SoftLink):
        _h5_follow_soft_link(f, name, link.path, path)
    ds = f[name]
    if not isinstance(ds, h5py.Dataset):
        raise DataError(f"{path}: {name!r} is a group, not a data set")
    if ds.external is not None:
        raise DataError(
            f"{path}: data set {name!r} keeps its values in another file ({ds.external[0][0]!r}); "
            "deepdot reads self-contained HDF5 files only"
        )
    if ds.is_virtual:
        raise DataError(
            f"{path}: data set {name!r} is a virtual data set mapped from other files; deepdot reads self-contained HDF5 files only"
        )
    if ds.shape is None:
        raise DataError(f"{path}: data set {name!r} is empty (no data space)")
    return ds


def _h5_bytes(ds: Any) -> int:
    """The array plus one chunk: a compressed chunk is decompressed whole, whatever the shape."""
    chunk = _count(ds.chunks) if ds.chunks else 0
    return (_count(ds.shape) + chunk) * ds.dtype.itemsize


def _check_h5(path: Path, xk: str, xd: Any, yk: str, yd: Any) -> None:
    for what, ds in ((f"images {xk!r}", xd), (f"labels {yk!r}", yd)):
        _check_kind(path, what, ds.dtype, "uif")
        if ds.dtype.fields is not None or ds.dtype.subdtype is not None:
            raise DataError(f"{path}: {what} have unsupported dtype {ds.dtype}")
    images = _h5_bytes(xd) + FLOAT32 * _count(xd.shape)
    DATA_BYTES.check(images, f"{path}: images of shape {xd.shape}", DataError)
    DATA_BYTES.check(images + _h5_bytes(yd) + 8 * _count(yd.shape), f"{path}: data sets {xk}, {yk}", DataError)


_H5_PAIRS = ("X_{split}", "Y_{split}"), ("X_test", "Y_test"), ("X_train", "Y_train"), ("x", "y")


def _load_h5(path: Path, split: str, num_classes: int | None) -> ImageData:
    import h5py

    with h5py.File(path, "r") as f:
        keys = set(f.keys())
        pair = _pick(keys, tuple((a.format(split=split), b.format(split=split)) for a, b in _H5_PAIRS))
        if pair is None:
            raise DataError(f"{path}: expected datasets X_test/Y_test (Neural Cleanse layout); found {sorted(keys)}")
        xk, yk = pair
        xd, yd = _h5_dataset(f, xk, path), _h5_dataset(f, yk, path)
        _check_h5(path, xk, xd, yk, yd)
        xa, ya = np.asarray(xd[()]), np.asarray(yd[()])
    y = to_labels(ya, str(path))
    k = num_classes or (ya.shape[1] if ya.ndim == 2 and ya.shape[1] > 1 else None)
    return _finish(to_nchw_unit(xa, str(path)), y, str(path), k)


def _load_folder(path: Path, num_classes: int | None) -> ImageData:
    x, y = read_folder(path)
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
        with reading(path, "image folder"):
            return _load_folder(path, num_classes)
    suffix = path.suffix.lower()
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")
    if suffix == ".npz":
        with reading(path, ".npz file"):
            return _load_npz(path, split, num_classes)
    if suffix in (".h5", ".hdf5"):
        with reading(path, "HDF5 file"):
            return _load_h5(path, split, num_classes)
    raise DataError(
        f"{path}: unsupported data format {suffix or '(none)'}; use .npz, .h5 or a folder of class subfolders"
    )
