"""Typed, immutable results of a mitigation, and the before/after figures reported for it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from deepdot.models import Classifier

if TYPE_CHECKING:
    from deepdot.mitigate.filter import TriggerFilter


@dataclass(frozen=True)
class PruningStep:
    """One point of the pruning curve (Neural Cleanse, Fig. 9–10; Fine-Pruning, Fig. 4).

    Attributes:
        pruned: units (neurons or channels) zeroed so far.
        fraction: ``pruned`` over the layer's unit count.
        clean_accuracy: on the clean data the mitigation was given.
        attack_success_rate: of the recovered trigger(s) on that data (highest over labels).
        net_attack_success_rate: the same, less the share of those images the model sends to
            the target label *without* the trigger (highest over labels). A trigger's success never falls below the model's own errors into its
            label, so this is the part of the success the trigger causes.
    """

    pruned: int
    fraction: float
    clean_accuracy: float
    attack_success_rate: float
    net_attack_success_rate: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "pruned": self.pruned,
            "fraction": round(self.fraction, 6),
            "clean_accuracy": self.clean_accuracy,
            "attack_success_rate": self.attack_success_rate,
            "net_attack_success_rate": self.net_attack_success_rate,
        }


@dataclass(frozen=True)
class PruningOutcome:
    """Which units of which layer were pruned, in pruning order, and the curve that led there."""

    layer: str
    units: int
    pruned_units: tuple[int, ...]
    curve: tuple[PruningStep, ...]

    @property
    def pruned_fraction(self) -> float:
        return len(self.pruned_units) / self.units if self.units else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "units": self.units,
            "pruned": len(self.pruned_units),
            "pruned_fraction": round(self.pruned_fraction, 6),
            "pruned_units": list(self.pruned_units),
            "curve": [s.to_dict() for s in self.curve],
        }


@dataclass(frozen=True)
class GuardPoint:
    """The model after ``epochs`` epochs of fine-tuning at learning rate ``lr`` (0 epochs: before
    training), measured on the check part of the clean data (not trained on)."""

    epochs: int
    lr: float
    clean_accuracy: float
    attack_success_rate: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "epochs": self.epochs,
            "lr": self.lr,
            "clean_accuracy": self.clean_accuracy,
            "attack_success_rate": self.attack_success_rate,
        }


@dataclass(frozen=True)
class GuardedTraining:
    """Fine-tuning under an accuracy budget (:func:`~deepdot.mitigate.guard.train_within_budget`).

    Attributes:
        loss: per-epoch training loss of every epoch run, all learning rates tried.
        points: every point measured on the check part, in order.
        kept: the point whose weights the model holds (the best within the budget).
        within_budget: whether ``kept`` is within the accuracy budget.
    """

    loss: tuple[float, ...]
    points: tuple[GuardPoint, ...]
    kept: GuardPoint
    within_budget: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "points": [p.to_dict() for p in self.points],
            "kept": self.kept.to_dict(),
            "within_budget": self.within_budget,
        }


@dataclass(frozen=True)
class MitigationResult:
    """What a mitigation produced.

    Attributes:
        method: ``filter``, ``prune``, ``unlearn``, ``fine-tune`` or ``fine-prune``.
        classifier: the repaired model (a copy; for ``filter`` the very model given to
            ``apply``, unchanged, whose inputs the filter screens).
        targets: the labels whose recovered triggers were mitigated.
        settings: the algorithm's settings.
        seconds: wall time.
        pruning: for pruning methods, what was pruned and the pruning curve.
        input_filter: for ``filter``, the calibrated filter.
        training_loss: per-epoch loss of any fine-tuning.
        fine_tuning: how any fine-tuning went under the accuracy budget (each epoch on the
            check part, and the one kept).
    """

    method: str
    classifier: Classifier
    targets: tuple[int, ...]
    settings: dict[str, Any]
    seconds: float
    pruning: PruningOutcome | None = None
    input_filter: TriggerFilter | None = None
    training_loss: tuple[float, ...] = ()
    fine_tuning: GuardedTraining | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "method": self.method,
            "targets": list(self.targets),
            "settings": _plain(self.settings),
            "seconds": round(self.seconds, 3),
        }
        if self.pruning is not None:
            out["pruning"] = self.pruning.to_dict()
        if self.input_filter is not None:
            out["filter"] = self.input_filter.to_dict()
        if self.training_loss:
            out["training_loss"] = list(self.training_loss)
        if self.fine_tuning is not None:
            out["fine_tuning"] = self.fine_tuning.to_dict()
        return out


def _plain(value: Any) -> Any:
    """Settings as JSON-friendly values (tuples become lists)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
