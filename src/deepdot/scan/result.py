"""Typed, immutable results of a trigger scan."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from deepdot.scan.outliers import OutlierStats
from deepdot.triggers import Trigger


@dataclass(frozen=True)
class LabelTrigger:
    """The smallest trigger found that sends clean images to ``label``.

    Attributes:
        label: candidate target label.
        trigger: recovered mask (H×W) and pattern (C×H×W).
        mask_l1: L1 norm of the mask (its size in pixels): small means suspicious.
        attack_success_rate: share of the scan's clean images the trigger sends to ``label``
            (measured in the step that produced the kept mask).
        reached_threshold: whether any step reached the success threshold (if not, the last
            mask is kept and its L1 is an upper bound, not a minimum).
        steps: optimisation steps run; image_passes: images pushed through the model
            (forward + backward); seconds: wall time; cpu_seconds: processor time of the
            scanning process (all its threads). On a shared machine the processor time of a
            one-thread scan is the steadier measure of its cost (it does not grow while other
            jobs hold the cores).
    """

    label: int
    trigger: Trigger
    mask_l1: float
    attack_success_rate: float
    reached_threshold: bool
    steps: int
    image_passes: int
    seconds: float
    cpu_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "mask_l1": self.mask_l1,
            "attack_success_rate": self.attack_success_rate,
            "reached_threshold": self.reached_threshold,
            "steps": self.steps,
            "image_passes": self.image_passes,
            "seconds": round(self.seconds, 3),
            "cpu_seconds": round(self.cpu_seconds, 3),
        }


@dataclass(frozen=True)
class ScanResult:
    """Outcome of scanning a model: a trigger per label and the outlier test over their sizes."""

    labels: tuple[LabelTrigger, ...]
    outliers: OutlierStats
    clean_accuracy: float
    seconds: float
    image_passes: int
    mode: str
    settings: dict[str, Any] = field(default_factory=dict)
    cpu_seconds: float = 0.0
    #: why the verdict may be shaky (e.g. few clean images); empty when there is nothing to say
    warnings: tuple[str, ...] = ()

    @property
    def infected(self) -> bool:
        return bool(self.outliers.flagged)

    @property
    def flagged(self) -> tuple[int, ...]:
        return self.outliers.flagged

    def trigger_for(self, label: int) -> Trigger:
        for item in self.labels:
            if item.label == label:
                return item.trigger
        raise KeyError(f"label {label} was not scanned")

    def to_dict(self) -> dict[str, Any]:
        by_label = dict(zip(self.outliers.labels, self.outliers.indices, strict=True))
        return {
            "mode": self.mode,
            "infected": self.infected,
            "flagged": list(self.flagged),
            **self.outliers.to_dict(),
            "clean_accuracy": self.clean_accuracy,
            "seconds": round(self.seconds, 3),
            "cpu_seconds": round(self.cpu_seconds, 3),
            "image_passes": self.image_passes,
            "labels": [{**t.to_dict(), "anomaly_index": by_label[t.label]} for t in self.labels],
            "settings": self.settings,
            "warnings": list(self.warnings),
        }


def stack_masks(labels: tuple[LabelTrigger, ...]) -> torch.Tensor:
    return torch.stack([t.trigger.mask for t in labels])
