"""Triggers: the one value shared by attacks, scans and mitigations.

A trigger is a mask ``m`` (H×W, values in [0, 1]) and a pattern ``p`` (C×H×W, [0, 1]); stamping
it onto images is ``x' = (1 - m) * x + m * p`` in pixel space (Neural Cleanse, S&P 2019, Eq. 1).
The constructors below build the families deepdot plants: BadNets square patches, image
(Trojan-style watermark) patches and blended full-image triggers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from deepdot.errors import DeepdotError

CORNERS = ("bottom-right", "bottom-left", "top-right", "top-left", "center")


@dataclass(frozen=True)
class Trigger:
    """Mask (H×W) and pattern (C×H×W), both float32 in [0, 1]. Immutable; :meth:`apply` is pure."""

    mask: torch.Tensor
    pattern: torch.Tensor

    def __post_init__(self) -> None:
        if self.mask.ndim != 2 or self.pattern.ndim != 3:
            raise DeepdotError(
                f"trigger mask must be H×W and pattern C×H×W, got {tuple(self.mask.shape)} and {tuple(self.pattern.shape)}"
            )
        if self.mask.numel() == 0 or self.pattern.shape[0] == 0:
            raise DeepdotError(f"trigger is empty ({tuple(self.pattern.shape)})")
        if tuple(self.mask.shape) != tuple(self.pattern.shape[1:]):
            raise DeepdotError(
                f"trigger mask {tuple(self.mask.shape)} and pattern {tuple(self.pattern.shape)} differ in size"
            )
        for name, t in (("mask", self.mask), ("pattern", self.pattern)):
            if not torch.isfinite(t).all() or t.min() < 0 or t.max() > 1:
                raise DeepdotError(f"trigger {name} values must lie in [0, 1]")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.pattern.shape
        return int(c), int(h), int(w)

    @property
    def mask_l1(self) -> float:
        """Sum of mask values: the trigger's size in pixels (Neural Cleanse's L1 norm)."""
        return float(self.mask.sum())

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Stamp the trigger onto [0, 1] images. Shape: N×C×H×W (or C×H×W) -> same.

        A one-channel pattern is broadcast over colour images; a colour pattern on grey images
        is averaged to grey.
        """
        if tuple(x.shape[-2:]) != tuple(self.mask.shape):
            raise DeepdotError(
                f"trigger is {self.mask.shape[0]}x{self.mask.shape[1]} but images are {x.shape[-2]}x{x.shape[-1]}"
            )
        pattern = self.pattern.to(x.device, x.dtype)
        channels = x.shape[-3]
        if pattern.shape[0] != channels:
            pattern = pattern.mean(0, keepdim=True) if channels == 1 else pattern.expand(channels, -1, -1)
        mask = self.mask.to(x.device, x.dtype)
        return (1 - mask) * x + mask * pattern

    def binary_mask(self, threshold: float = 0.5) -> torch.Tensor:
        return self.mask >= threshold

    def hardened(self, threshold: float = 0.1) -> Trigger:
        """The same trigger at full strength: mask 1 wherever it is at least ``threshold``, else 0.

        A reverse-engineered trigger is the *smallest* soft mask that still works, so a defence
        can defeat it while the attacker's full-strength stamp still gets through. Its hardened
        form is a closer stand-in for the planted trigger (used by the mitigations' checks).
        """
        return Trigger(self.binary_mask(threshold).to(self.pattern.dtype), self.pattern)


def mask_iou(a: torch.Tensor, b: torch.Tensor, threshold: float = 0.5) -> float:
    """Intersection over union of two masks binarised at ``threshold`` (0.0 when both are empty)."""
    ba, bb = a >= threshold, b >= threshold
    union = (ba | bb).sum().item()
    return float((ba & bb).sum().item() / union) if union else 0.0


def _colour(color: float | tuple[float, ...] | list[float], channels: int) -> torch.Tensor:
    values = [float(color)] * channels if isinstance(color, (int, float)) else [float(c) for c in color]
    if len(values) == 1:
        values = values * channels
    if len(values) != channels or any(not 0 <= v <= 1 for v in values):
        raise DeepdotError(f"trigger colour must be {channels} value(s) in [0, 1], got {color}")
    return torch.tensor(values, dtype=torch.float32).view(channels, 1, 1)


def place(
    image_shape: tuple[int, int, int],
    size: tuple[int, int],
    *,
    corner: str = "bottom-right",
    margin: int = 1,
    position: tuple[int, int] | None = None,
) -> tuple[int, int]:
    """Top-left (row, col) of a ``size`` patch at ``position`` or in ``corner`` with ``margin``."""
    _, h, w = image_shape
    ph, pw = size
    if position is not None:
        top, left = int(position[0]), int(position[1])
    elif corner == "bottom-right":
        top, left = h - margin - ph, w - margin - pw
    elif corner == "bottom-left":
        top, left = h - margin - ph, margin
    elif corner == "top-right":
        top, left = margin, w - margin - pw
    elif corner == "top-left":
        top, left = margin, margin
    elif corner == "center":
        top, left = (h - ph) // 2, (w - pw) // 2
    else:
        raise DeepdotError(f"unknown corner {corner!r}; use one of {', '.join(CORNERS)}")
    if ph < 1 or pw < 1 or top < 0 or left < 0 or top + ph > h or left + pw > w:
        raise DeepdotError(f"a {ph}x{pw} trigger at row {top}, column {left} does not fit a {h}x{w} image")
    return top, left


def square(
    image_shape: tuple[int, int, int],
    size: int = 4,
    *,
    corner: str = "bottom-right",
    margin: int = 1,
    position: tuple[int, int] | None = None,
    color: float | tuple[float, ...] = 1.0,
) -> Trigger:
    """BadNets-style solid square patch. ``square((3, 32, 32), 4)`` is Neural Cleanse's GTSRB trigger
    (white 4×4, bottom-right, 1-pixel margin)."""
    c, h, w = image_shape
    top, left = place(image_shape, (size, size), corner=corner, margin=margin, position=position)
    mask = torch.zeros(h, w)
    mask[top : top + size, left : left + size] = 1.0
    pattern = torch.zeros(c, h, w)
    pattern[:, top : top + size, left : left + size] = _colour(color, c)
    return Trigger(mask, pattern)


def image_patch(
    image: np.ndarray,
    image_shape: tuple[int, int, int],
    size: int,
    *,
    corner: str = "bottom-right",
    margin: int = 1,
    position: tuple[int, int] | None = None,
    alpha: float = 1.0,
) -> Trigger:
    """A picture (H×W×3 or H×W×4 uint8; alpha channel = shape) resized to ``size``×``size`` and
    placed like :func:`square`: the Trojan-attack watermark/sticker family. ``alpha`` < 1 blends it."""
    from PIL import Image

    c, h, w = image_shape
    if not 0 < alpha <= 1:
        raise DeepdotError(f"trigger alpha must be in (0, 1], got {alpha}")
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    rgba = (
        arr if arr.shape[-1] == 4 else np.concatenate([arr[..., :3], np.full(arr.shape[:2] + (1,), 255, arr.dtype)], -1)
    )
    small = np.asarray(Image.fromarray(rgba.astype(np.uint8), "RGBA").resize((size, size), Image.Resampling.BILINEAR))
    small = small.astype(np.float32) / 255.0
    top, left = place(image_shape, (size, size), corner=corner, margin=margin, position=position)
    mask = torch.zeros(h, w)
    mask[top : top + size, left : left + size] = torch.from_numpy(small[..., 3] * alpha)
    rgb = torch.from_numpy(small[..., :3]).permute(2, 0, 1)
    pattern = torch.zeros(c, h, w)
    pattern[:, top : top + size, left : left + size] = rgb.mean(0, keepdim=True) if c == 1 else rgb
    return Trigger(mask, pattern)


def blended(
    image_shape: tuple[int, int, int], alpha: float = 0.1, *, image: np.ndarray | None = None, seed: int = 0
) -> Trigger:
    """A whole-image trigger blended with weight ``alpha`` (Chen et al. 2017): a picture resized to
    the image size, or uniform noise from ``seed`` when no picture is given."""
    from PIL import Image

    c, h, w = image_shape
    if not 0 < alpha <= 1:
        raise DeepdotError(f"trigger alpha must be in (0, 1], got {alpha}")
    if image is None:
        pattern = torch.rand(c, h, w, generator=torch.Generator().manual_seed(seed))
    else:
        arr = np.asarray(image)
        mode = "L" if c == 1 else "RGB"
        pil = Image.fromarray(arr.astype(np.uint8)).convert(mode).resize((w, h), Image.Resampling.BILINEAR)
        a = np.asarray(pil, dtype=np.float32) / 255.0
        pattern = torch.from_numpy(a[None] if c == 1 else a.transpose(2, 0, 1).copy())
    return Trigger(torch.full((h, w), float(alpha)), pattern)


def random_pixels(image_shape: tuple[int, int, int], pixels: int = 16, *, seed: int = 0) -> Trigger:
    """``pixels`` scattered pixels with random colours (Xiong et al. 2020, Alg. 2's trigger)."""
    c, h, w = image_shape
    if not 0 < pixels <= h * w:
        raise DeepdotError(f"random-pixel trigger needs 1..{h * w} pixels, got {pixels}")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(h * w, generator=g)[:pixels]
    mask = torch.zeros(h * w)
    mask[idx] = 1.0
    pattern = torch.rand(c, h, w, generator=g) * mask.view(1, h, w)
    return Trigger(mask.view(h, w), pattern)
