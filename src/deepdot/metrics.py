"""Figures every stage reports: clean accuracy and attack success rate."""

from __future__ import annotations

import torch

from deepdot.data import ImageData
from deepdot.models import Classifier
from deepdot.triggers import Trigger

ALL_TO_ALL = -1
"""``target`` value meaning the all-to-all attack: label y is sent to (y + 1) mod K."""


def clean_accuracy(classifier: Classifier, data: ImageData, batch_size: int = 512) -> float:
    """Fraction of ``data`` classified correctly."""
    pred = classifier.predict(data.x, batch_size=batch_size)
    return float((pred == data.y).float().mean())


def attack_targets(y: torch.Tensor, target: int, num_classes: int) -> torch.Tensor:
    """The label each triggered image should be sent to (all-to-one or all-to-all)."""
    if target == ALL_TO_ALL:
        return (y + 1) % num_classes
    return torch.full_like(y, int(target))


def attack_success_rate(
    classifier: Classifier, data: ImageData, trigger: Trigger, target: int, batch_size: int = 512
) -> float:
    """Fraction of triggered images classified as the attacker's label.

    All-to-one: measured on images whose true label is not ``target`` (as in BadNets and
    Neural Cleanse). All-to-all (``target=ALL_TO_ALL``): on every image, success = y + 1.
    """
    keep = torch.ones(len(data), dtype=torch.bool) if target == ALL_TO_ALL else data.y != target
    if not keep.any():
        return float("nan")
    x, y = data.x[keep], data.y[keep]
    goal = attack_targets(y, target, data.num_classes)
    hits = 0
    for i in range(0, len(x), batch_size):
        pred = classifier.predict(trigger.apply(x[i : i + batch_size]), batch_size=batch_size)
        hits += int((pred == goal[i : i + batch_size]).sum())
    return hits / len(x)
