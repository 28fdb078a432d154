"""The scan's result types; they live in :mod:`deepdot.results` (below every algorithm)."""

from __future__ import annotations

import torch

from deepdot.results import LabelTrigger, ScanResult

__all__ = ["LabelTrigger", "ScanResult", "stack_masks"]


def stack_masks(labels: tuple[LabelTrigger, ...]) -> torch.Tensor:
    return torch.stack([t.trigger.mask for t in labels])
