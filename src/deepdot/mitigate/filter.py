"""Neural Cleanse's input filter (Wang et al., IEEE S&P 2019, Sec. VI-A).

The neurons of the second-to-last layer that the recovered trigger excites most (the top 1 %)
also fire on inputs carrying the real trigger. An input is scored by the mean activation of
those neurons and flagged when the score exceeds a threshold calibrated on clean inputs for a
chosen false-positive rate (the paper reports FNR at 5 % FPR).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from deepdot.data import ImageData
from deepdot.mitigate.base import Mitigation, MitigationError, RecoveredBackdoor, Repaired
from deepdot.mitigate.layers import resolve_layer, unit_activations
from deepdot.mitigate.ranking import rank_by_trigger
from deepdot.models import Classifier
from deepdot.progress import ProgressEvent, ProgressFn


@dataclass(frozen=True)
class TriggerFilter:
    """A calibrated input filter: flags inputs whose ``neurons`` of ``layer`` fire above ``threshold``.

    It holds no model: :meth:`score` and :meth:`flag` take the classifier it was calibrated on.

    Attributes:
        layer: module name whose units are read.
        neurons: the units whose mean activation is the score.
        threshold: scores strictly above it are flagged.
        target_false_positive_rate: the false-positive rate it was calibrated for.
        calibration_false_positive_rate: the rate reached on the calibration images.
        targets: the labels whose recovered triggers chose the neurons.
    """

    layer: str
    neurons: tuple[int, ...]
    threshold: float
    target_false_positive_rate: float
    calibration_false_positive_rate: float
    targets: tuple[int, ...]

    def score(self, classifier: Classifier, x: torch.Tensor) -> torch.Tensor:
        """Mean activation of the filter's neurons per image. Shape: N×C×H×W -> (N,)."""
        acts = unit_activations(classifier, x, self.layer)
        return acts[:, list(self.neurons)].mean(1)

    def flag(self, classifier: Classifier, x: torch.Tensor) -> torch.Tensor:
        """Which images the filter rejects as carrying a trigger. Shape: N×C×H×W -> (N,) bool."""
        return self.score(classifier, x) > self.threshold

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "neurons": list(self.neurons),
            "threshold": self.threshold,
            "target_false_positive_rate": self.target_false_positive_rate,
            "calibration_false_positive_rate": self.calibration_false_positive_rate,
            "targets": list(self.targets),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TriggerFilter:
        """Read back :meth:`to_dict` (e.g. a saved ``filter.json``)."""
        try:
            if not all(math.isfinite(float(data[k])) for k in ("threshold", "target_false_positive_rate")):
                raise ValueError("its threshold is not a finite number")
            return cls(
                layer=str(data["layer"]),
                neurons=tuple(int(n) for n in data["neurons"]),
                threshold=float(data["threshold"]),
                target_false_positive_rate=float(data["target_false_positive_rate"]),
                calibration_false_positive_rate=float(data["calibration_false_positive_rate"]),
                targets=tuple(int(t) for t in data.get("targets", ())),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise MitigationError(f"not a deepdot input filter: {exc}") from exc


@dataclass(frozen=True, kw_only=True)
class InputFilter(Mitigation):
    """Fit Neural Cleanse's input filter on clean data.

    The model is left unchanged and is not copied: the filter is fitted on it, and the result's
    ``classifier`` is the very model given to :meth:`apply` (the same object, not a copy), the
    one the filter screens inputs for.

    Args:
        layer: ``penultimate`` (the paper's choice), ``last_conv`` or a module name.
        top_fraction: share of the layer's neurons whose mean activation scores an input (1 %).
        min_neurons: at least this many neurons (1 % of a small layer is less than one).
        false_positive_rate: share of clean inputs the threshold lets be flagged (5 %).
    """

    method = "filter"
    changes_model = False

    layer: str = "penultimate"
    top_fraction: float = 0.01
    min_neurons: int = 5
    false_positive_rate: float = 0.05

    def __post_init__(self) -> None:
        if not 0 < self.top_fraction <= 1:
            raise MitigationError(f"top_fraction must be in (0, 1], got {self.top_fraction}")
        if self.min_neurons < 1:
            raise MitigationError(f"min_neurons must be at least 1, got {self.min_neurons}")
        if not 0 < self.false_positive_rate < 1:
            raise MitigationError(f"false_positive_rate must be in (0, 1), got {self.false_positive_rate}")

    def check(self, classifier: Classifier, clean_data: ImageData) -> None:
        """The layer resolves and can be hooked (not TorchScript)."""
        resolve_layer(classifier, self.layer, self.method)

    def fit(self, classifier: Classifier, backdoors: tuple[RecoveredBackdoor, ...], clean: ImageData) -> TriggerFilter:
        """Choose the neurons with the recovered triggers and calibrate the threshold on ``clean``."""
        layer = resolve_layer(classifier, self.layer, self.method)
        order = rank_by_trigger(classifier, layer, backdoors, clean)
        count = min(len(order), max(self.min_neurons, math.ceil(self.top_fraction * len(order))))
        neurons = tuple(int(n) for n in order[:count])
        scores = unit_activations(classifier, clean.x, layer)[:, list(neurons)].mean(1)
        threshold = float(torch.quantile(scores.double(), 1.0 - self.false_positive_rate))
        return TriggerFilter(
            layer=layer,
            neurons=neurons,
            threshold=threshold,
            target_false_positive_rate=self.false_positive_rate,
            calibration_false_positive_rate=float((scores > threshold).float().mean()),
            targets=tuple(b.target for b in backdoors),
        )

    def _run(
        self,
        classifier: Classifier,
        backdoors: tuple[RecoveredBackdoor, ...],
        clean_data: ImageData,
        progress: ProgressFn,
    ) -> Repaired:
        progress(ProgressEvent("filter", 0, 1))
        fitted = self.fit(classifier, backdoors, clean_data)
        progress(ProgressEvent("filter", 1, 1))
        return Repaired(classifier, input_filter=fitted)
