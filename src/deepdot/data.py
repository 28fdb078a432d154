"""The in-memory data set type shared by every stage, and pure helpers on it."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from deepdot.errors import DataError


@dataclass(frozen=True)
class ImageData:
    """Images with integer labels.

    Attributes:
        x: float32 tensor in [0, 1], shape N×C×H×W.
        y: int64 tensor of labels in ``[0, num_classes)``, shape N.
        num_classes: number of labels the task has (may exceed ``y.max() + 1``).
        name: where the data came from (for messages and reports).
        groups: optional int64 tensor (N,) of group ids (e.g. GTSRB tracks); splits keep
            groups together so near-duplicate frames cannot leak between train and validation.
    """

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    name: str = "data"
    groups: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.x.ndim != 4:
            raise DataError(f"{self.name}: images must be N×C×H×W, got shape {tuple(self.x.shape)}")
        if len(self.x) != len(self.y):
            raise DataError(f"{self.name}: {len(self.x)} images but {len(self.y)} labels")
        if len(self.x) == 0:
            raise DataError(f"{self.name}: the data set is empty")
        if self.y.min() < 0 or self.y.max() >= self.num_classes:
            raise DataError(
                f"{self.name}: labels must lie in 0..{self.num_classes - 1}, found {int(self.y.min())}..{int(self.y.max())}"
            )

    def __len__(self) -> int:
        return len(self.y)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.x.shape[1:]
        return int(c), int(h), int(w)

    def fitted_to(self, input_shape: tuple[int, int, int], num_classes: int) -> ImageData:
        """This data for a model taking ``input_shape`` images and ``num_classes`` labels (the
        task's label count becomes the model's), or a :class:`DataError` saying why it does not fit.
        """
        if self.image_shape != tuple(input_shape):
            raise DataError(
                f"{self.name}: images are {'x'.join(map(str, self.image_shape))} but the model takes "
                f"{'x'.join(map(str, input_shape))}"
            )
        if self.num_classes > num_classes:
            raise DataError(
                f"{self.name}: labels go up to {self.num_classes - 1} but the model has {num_classes} classes"
            )
        return ImageData(self.x, self.y, num_classes, self.name, self.groups)

    def subset(self, index: torch.Tensor | np.ndarray | list[int], name: str | None = None) -> ImageData:
        idx = torch.as_tensor(np.asarray(index), dtype=torch.long)
        return ImageData(
            self.x[idx],
            self.y[idx],
            self.num_classes,
            name or self.name,
            None if self.groups is None else self.groups[idx],
        )

    def take(self, n: int, seed: int = 0) -> ImageData:
        """A random subset of at most ``n`` images (all of them, reordered, if n >= len)."""
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(self), generator=g)[:n]
        return self.subset(perm)

    def split(self, fraction: float, seed: int = 0) -> tuple[ImageData, ImageData]:
        """Split into (rest, held_out) with about ``fraction`` of the images held out.

        With ``groups`` set, whole groups are held out; otherwise the split is stratified by
        label so every label keeps its share.
        """
        if not 0.0 < fraction < 1.0:
            raise DataError(f"{self.name}: split fraction must be in (0, 1), got {fraction}")
        rng = np.random.default_rng(seed)
        y = self.y.numpy()
        held = np.zeros(len(y), dtype=bool)
        if self.groups is not None:
            g = self.groups.numpy()
            # hold out whole groups, label by label, so every label keeps its share
            for label in np.unique(y):
                ids = np.unique(g[y == label])
                rng.shuffle(ids)
                n = max(1, int(round(len(ids) * fraction))) if len(ids) > 1 else 0
                held |= np.isin(g, ids[:n]) & (y == label)
        else:
            for label in np.unique(y):
                idx = np.flatnonzero(y == label)
                rng.shuffle(idx)
                n = int(round(len(idx) * fraction))
                if len(idx) > 1:
                    n = min(max(n, 1), len(idx) - 1)
                else:
                    n = 0
                held[idx[:n]] = True
        if held.all() or not held.any():
            raise DataError(f"{self.name}: too few images to split off {fraction:.0%}")
        return (
            self.subset(np.flatnonzero(~held), f"{self.name}[train]"),
            self.subset(np.flatnonzero(held), f"{self.name}[held-out]"),
        )


def to_nchw_unit(array: np.ndarray, source: str) -> torch.Tensor:
    """Convert an image array (N×H×W, N×H×W×C or N×C×H×W; uint8 or float) to float32 [0,1] NCHW.

    Float input is taken as [0, 1] if its maximum is <= 1, else as 0-255. Channels-first is
    assumed when the second axis has 1 or 3 entries and the last does not.

    Memory: one float32 copy of the input (scaled in place), so a reader that has checked
    "raw array + 4 bytes per value" against its limit has bounded the peak.
    """
    a = np.asarray(array)
    if a.ndim == 3:
        a = a[:, None, :, :]
    if a.ndim != 4:
        raise DataError(f"{source}: images must have 3 or 4 dimensions, got shape {a.shape}")
    if a.shape[-1] in (1, 3, 4) and a.shape[1] not in (1, 3, 4):
        a = a.transpose(0, 3, 1, 2)
    elif a.shape[1] not in (1, 3, 4):
        raise DataError(f"{source}: cannot tell the channel axis of images with shape {a.shape}")
    if a.shape[1] == 4:  # drop alpha
        a = a[:, :3]
    if a.dtype == np.uint8:
        out = np.array(a, dtype=np.float32, order="C")
        out /= 255.0
    elif np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer):
        with np.errstate(over="ignore", invalid="ignore"):  # too large for float32: Inf, refused below
            out = np.array(a, dtype=np.float32, order="C")  # always a copy: scaled in place below
        lo, hi = (float(out.min()), float(out.max())) if out.size else (0.0, 0.0)
        if not (np.isfinite(lo) and np.isfinite(hi)):  # min and max carry any NaN and show ±Inf
            raise DataError(f"{source}: images contain NaN or Inf")
        if lo < 0:
            raise DataError(f"{source}: negative pixel values; expected [0,1] or 0-255 images")
        if hi > 255.0:
            raise DataError(f"{source}: pixel values up to {hi:g}; expected [0,1] or 0-255 images")
        if hi > 1.0:
            out /= 255.0
    else:
        raise DataError(f"{source}: unsupported image dtype {a.dtype}")
    return torch.from_numpy(out)


def to_labels(array: np.ndarray, source: str) -> torch.Tensor:
    """Integer labels from integer or one-hot (N×K) arrays."""
    a = np.asarray(array)
    if a.ndim == 2 and a.shape[1] > 1:
        a = a.argmax(axis=1)
    elif a.ndim == 2:
        a = a[:, 0]
    if a.ndim != 1:
        raise DataError(f"{source}: labels must be a vector or one-hot matrix, got shape {a.shape}")
    if np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)) or not np.all(a == np.round(a)):
            raise DataError(f"{source}: labels are not whole numbers")
        if a.size and (a.min() < 0 or a.max() >= 2**31):  # before the cast, which would wrap them
            raise DataError(f"{source}: labels range over {a.min():g}..{a.max():g}; expected class numbers from 0")
    elif not np.issubdtype(a.dtype, np.integer):
        raise DataError(f"{source}: labels have unsupported dtype {a.dtype}")
    return torch.from_numpy(a.astype(np.int64))
