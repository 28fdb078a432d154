"""``auto``: try several mitigations and keep the one that removes the recovered trigger best
without costing more clean accuracy than a budget.

The choice is made on a *validation* part split off the repair data, never on data the caller
reports figures on: choosing on the held-out images and then reporting them would flatter the
winner. Every candidate repairs the same model on the same remaining repair images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from deepdot.data import ImageData
from deepdot.mitigate.base import BackdoorSource, Mitigation, MitigationError, recovered_backdoors
from deepdot.mitigate.evaluation import Figures, choose_best, measure
from deepdot.mitigate.result import MitigationResult
from deepdot.models import Classifier
from deepdot.progress import ProgressFn, no_progress


@dataclass(frozen=True)
class Candidate:
    """One method ``auto`` tried: what it produced and its figures on the validation part."""

    name: str
    result: MitigationResult
    validation: Figures


@dataclass(frozen=True)
class AutoResult:
    """What ``auto`` chose and why.

    Attributes:
        winner: the kept method's name.
        within_budget: whether the winner kept validation accuracy within ``max_accuracy_drop``
            (if no candidate did, the one that lost least is kept and this is False).
        before: the unrepaired model's figures on the validation part.
        candidates: every method tried, in the order tried.
        validation_images: size of the validation part.
        max_accuracy_drop: the budget the choice was made under.
    """

    winner: str
    within_budget: bool
    before: Figures
    candidates: tuple[Candidate, ...]
    validation_images: int
    max_accuracy_drop: float

    @property
    def result(self) -> MitigationResult:
        """The winner's :class:`MitigationResult`."""
        return next(c.result for c in self.candidates if c.name == self.winner)


@dataclass(frozen=True, kw_only=True)
class AutoMitigation:
    """Apply each of ``candidates`` and keep the lowest recovered attack success whose clean
    accuracy drops at most ``max_accuracy_drop`` on a validation split of the repair data.

    Args:
        candidates: the mitigations to try (e.g. from :func:`~deepdot.mitigate.registry.build_mitigation`).
        max_accuracy_drop: the accuracy budget (0.01 = one point).
        validation_fraction: share of the repair data held back to choose on.
        seed: the split.
    """

    candidates: Sequence[Mitigation]
    max_accuracy_drop: float = 0.01
    validation_fraction: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.candidates:
            raise MitigationError("auto needs at least one candidate method")
        if not 0 <= self.max_accuracy_drop < 1 or not 0 < self.validation_fraction < 1:
            raise MitigationError("auto needs max_accuracy_drop in [0, 1) and validation_fraction in (0, 1)")

    def apply(
        self,
        classifier: Classifier,
        backdoor: BackdoorSource,
        clean_data: ImageData,
        *,
        progress: ProgressFn = no_progress,
    ) -> AutoResult:
        """Repair copies of ``classifier`` with every candidate and choose (the input is not modified)."""
        backdoors = recovered_backdoors(backdoor)
        repair, validation = clean_data.split(self.validation_fraction, seed=self.seed)
        before = measure(classifier, validation, backdoors)
        tried = []
        for mitigation in self.candidates:
            result = mitigation.apply(classifier, backdoors, repair, progress=progress)
            tried.append(Candidate(result.method, result, measure(result.classifier, validation, backdoors)))
        figures = {c.name: c.validation for c in tried}
        best = choose_best(before, figures, self.max_accuracy_drop)
        winner = best if best is not None else max(tried, key=lambda c: c.validation.clean_accuracy).name
        return AutoResult(
            winner=winner,
            within_budget=best is not None,
            before=before,
            candidates=tuple(tried),
            validation_images=len(validation),
            max_accuracy_drop=self.max_accuracy_drop,
        )
