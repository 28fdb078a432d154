"""Ranking units by how strongly a recovered trigger excites them (Neural Cleanse, Sec. VI-A/B)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from deepdot.data import ImageData
from deepdot.mitigate.base import RecoveredBackdoor, triggered_images
from deepdot.mitigate.layers import unit_activations
from deepdot.models import Classifier


def trigger_activation_gap(
    classifier: Classifier, layer: str, backdoors: Sequence[RecoveredBackdoor], clean: ImageData
) -> torch.Tensor:
    """Mean activation of each unit on triggered images minus on the same images clean.

    With several backdoors the largest gap per unit counts. Shape: (units,).
    """
    gaps = []
    for b in backdoors:
        keep = clean.y != b.target
        clean_acts = unit_activations(classifier, clean.x[keep], layer)
        trig_acts = unit_activations(classifier, triggered_images(clean, b), layer)
        gaps.append((trig_acts - clean_acts).mean(0))
    return torch.stack(gaps).amax(0)


def rank_by_trigger(
    classifier: Classifier, layer: str, backdoors: Sequence[RecoveredBackdoor], clean: ImageData
) -> torch.Tensor:
    """Units of ``layer`` in decreasing order of :func:`trigger_activation_gap` (the order Neural
    Cleanse prunes in and picks the filter's neurons by). Shape: (units,), int64."""
    return torch.argsort(trigger_activation_gap(classifier, layer, backdoors, clean), descending=True, stable=True)
