"""Measuring a mitigation on held-out clean data, and choosing among several (``auto``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from deepdot.data import ImageData
from deepdot.metrics import attack_success_rate, attack_targets, clean_accuracy
from deepdot.mitigate.base import RecoveredBackdoor
from deepdot.mitigate.filter import TriggerFilter
from deepdot.models import Classifier
from deepdot.results import Backdoor
from deepdot.triggers import Trigger

#: the attacker's real trigger and target, when known (to measure a defence, never to build it);
#: ``target`` may be :data:`deepdot.metrics.ALL_TO_ALL`
PlantedBackdoor = Backdoor


@dataclass(frozen=True)
class Figures:
    """Clean accuracy and attack success rates of one model on held-out data.

    ``attack_success_rate`` is the recovered trigger's (the highest over flagged labels);
    ``planted_attack_success_rate`` the real trigger's, when known.
    """

    clean_accuracy: float
    attack_success_rate: float
    planted_attack_success_rate: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"clean_accuracy": self.clean_accuracy, "attack_success_rate": self.attack_success_rate}
        if self.planted_attack_success_rate is not None:
            out["planted_attack_success_rate"] = self.planted_attack_success_rate
        return out


def measure(
    classifier: Classifier,
    data: ImageData,
    backdoors: Sequence[RecoveredBackdoor],
    planted: PlantedBackdoor | None = None,
) -> Figures:
    """:class:`Figures` of ``classifier`` on ``data``."""
    return Figures(
        clean_accuracy=clean_accuracy(classifier, data),
        attack_success_rate=max(attack_success_rate(classifier, data, b.trigger, b.target) for b in backdoors),
        planted_attack_success_rate=None
        if planted is None
        else attack_success_rate(classifier, data, planted.trigger, planted.target),
    )


def _filtered_success(
    classifier: Classifier, flt: TriggerFilter, data: ImageData, trigger: Trigger, target: int
) -> tuple[float, float]:
    """(false-negative rate, attack success through the filter) of a trigger on ``data``."""
    keep = torch.ones(len(data), dtype=torch.bool) if target < 0 else data.y != target
    x = trigger.apply(data.x[keep])
    flagged = flt.flag(classifier, x)
    goal = attack_targets(data.y[keep], target, data.num_classes)
    hits = (classifier.predict(x) == goal) & ~flagged
    return float((~flagged).float().mean()), float(hits.float().mean())


@dataclass(frozen=True)
class FilterFigures:
    """How a :class:`TriggerFilter` does on held-out data.

    Attributes:
        false_positive_rate: share of clean images flagged.
        false_negative_rate: share of images with a recovered trigger let through (highest over labels).
        planted_false_negative_rate: share of images with the real trigger let through, when known.
        behind_filter: the model behind the filter: clean accuracy counts flagged clean images as
            errors; attack success counts only triggered images let through.
    """

    false_positive_rate: float
    false_negative_rate: float
    planted_false_negative_rate: float | None
    behind_filter: Figures

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "false_positive_rate": self.false_positive_rate,
            "false_negative_rate": self.false_negative_rate,
        }
        if self.planted_false_negative_rate is not None:
            out["planted_false_negative_rate"] = self.planted_false_negative_rate
        return out


def measure_filter(
    classifier: Classifier,
    flt: TriggerFilter,
    data: ImageData,
    backdoors: Sequence[RecoveredBackdoor],
    planted: PlantedBackdoor | None = None,
) -> FilterFigures:
    """:class:`FilterFigures` of ``flt`` in front of ``classifier`` on held-out ``data``."""
    flagged_clean = flt.flag(classifier, data.x)
    correct = (classifier.predict(data.x) == data.y) & ~flagged_clean
    recovered = [_filtered_success(classifier, flt, data, b.trigger, b.target) for b in backdoors]
    real = None if planted is None else _filtered_success(classifier, flt, data, planted.trigger, planted.target)
    return FilterFigures(
        false_positive_rate=float(flagged_clean.float().mean()),
        false_negative_rate=max(r[0] for r in recovered),
        planted_false_negative_rate=None if real is None else real[0],
        behind_filter=Figures(
            clean_accuracy=float(correct.float().mean()),
            attack_success_rate=max(r[1] for r in recovered),
            planted_attack_success_rate=None if real is None else real[1],
        ),
    )


def choose_best(before: Figures, candidates: Mapping[str, Figures], max_accuracy_drop: float = 0.01) -> str | None:
    """The candidate with the lowest recovered attack success rate among those whose clean
    accuracy is at most ``max_accuracy_drop`` below ``before`` (ties: higher accuracy, then
    the order given). None if no candidate keeps accuracy."""
    allowed = [
        (fig.attack_success_rate, -fig.clean_accuracy, i, name)
        for i, (name, fig) in enumerate(candidates.items())
        if fig.clean_accuracy >= before.clean_accuracy - max_accuracy_drop - 1e-12
    ]
    return min(allowed)[3] if allowed else None
