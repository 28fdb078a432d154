"""``deepdot mitigate`` as one function: repair a model with one method (or ``auto``) and measure
it before and after on held-out data. Pure: models and data in, a typed report out; the command
line only loads, calls :func:`repair` and writes :meth:`RepairReport.to_dict` as
``mitigation.json``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from deepdot.data import ImageData
from deepdot.errors import DeepdotError
from deepdot.metrics import ALL_TO_ALL
from deepdot.mitigate.auto import AutoMitigation, AutoResult
from deepdot.mitigate.base import Mitigation, RecoveredBackdoor
from deepdot.mitigate.evaluation import Figures, FilterFigures, PlantedBackdoor, measure, measure_filter
from deepdot.mitigate.registry import AUTO_METHODS
from deepdot.mitigate.result import MitigationResult
from deepdot.models import Classifier
from deepdot.progress import ProgressFn, no_progress

AUTO = "auto"


@dataclass(frozen=True)
class RepairBudget:
    """What a repair must achieve on the held-out data to count as one.

    A model repair (every method but the filter) must keep clean accuracy within
    ``max_accuracy_drop`` of the unrepaired model's and bring the recovered triggers' attack
    success to at most ``max_attack_success``. The filter leaves the model unchanged; its cost is
    the clean images it rejects, calibrated to its own false-positive rate, so it must reject at
    most that rate plus ``max_accuracy_drop`` of clean images and let at most
    ``max_attack_success`` of the triggered ones through to the target.

    Args:
        max_accuracy_drop: clean accuracy the repair may cost (0.01 = one point).
        max_attack_success: recovered attack success left at most.
    """

    max_accuracy_drop: float = 0.01
    max_attack_success: float = 0.05

    def __post_init__(self) -> None:
        if not 0 <= self.max_accuracy_drop < 1 or not 0 <= self.max_attack_success < 1:
            raise DeepdotError("the repair budget needs max_accuracy_drop and max_attack_success in [0, 1)")

    def met(
        self, before: Figures, after: Figures, screened: FilterFigures | None = None, calibrated_for: float = 0.0
    ) -> bool:
        """Whether going from ``before`` to ``after`` is a repair; for a filter, ``after`` is
        behind the filter, ``screened`` its figures and ``calibrated_for`` the false-positive
        rate it was calibrated for."""
        if after.attack_success_rate > self.max_attack_success + 1e-12:
            return False
        if screened is not None:
            return screened.false_positive_rate <= calibrated_for + self.max_accuracy_drop + 1e-12
        return after.clean_accuracy >= before.clean_accuracy - self.max_accuracy_drop - 1e-12

    def to_dict(self) -> dict[str, float]:
        return {"max_accuracy_drop": self.max_accuracy_drop, "max_attack_success": self.max_attack_success}


@dataclass(frozen=True)
class RepairReport:
    """A repair and its figures on held-out data (``mitigation.json``).

    Attributes:
        requested_method: what was asked for (a method name or ``auto``).
        result: the kept repair (for ``auto``, the winner's).
        labels: the labels whose recovered triggers were mitigated.
        before / after: figures of the model before and after, on the held-out data.
        filter: for the filter, its false-positive and false-negative rates on the held-out data.
        auto: for ``auto``, the choice (made on a validation part of the repair data).
        candidates_after: for ``auto``, every candidate's figures on the held-out data (reported,
            never used to choose).
        budget: what counts as a repair (see :class:`RepairBudget`); :attr:`within_budget` says
            whether this one is.
    """

    requested_method: str
    result: MitigationResult
    labels: tuple[int, ...]
    repair_data: str
    repair_images: int
    test_data: str
    test_images: int
    before: Figures
    after: Figures
    planted_target: int | None = None
    filter: FilterFigures | None = None
    auto: AutoResult | None = None
    candidates_after: Mapping[str, Figures] = field(default_factory=dict)
    budget: RepairBudget = field(default_factory=lambda: RepairBudget())

    @property
    def method(self) -> str:
        return self.result.method

    @property
    def within_budget(self) -> bool:
        """Whether the repair removed the recovered triggers within the budget, on the held-out
        data (see :meth:`RepairBudget.met`)."""
        flt = self.result.input_filter
        calibrated_for = flt.target_false_positive_rate if flt is not None else 0.0
        return self.budget.met(self.before, self.after, self.filter, calibrated_for)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "method": self.method,
            "requested_method": self.requested_method,
            "labels": list(self.labels),
            "repair_data": self.repair_data,
            "test_data": self.test_data,
            "repair_images": self.repair_images,
            "test_images": self.test_images,
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "pruning_curve": [s.to_dict() for s in self.result.pruning.curve] if self.result.pruning else None,
            "filter": self.filter.to_dict() if self.filter is not None else None,
            "details": self.result.to_dict(),
            "within_budget": self.within_budget,
            "budget": self.budget.to_dict(),
        }
        if self.planted_target is not None:
            out["planted_target"] = "all-to-all" if self.planted_target == ALL_TO_ALL else self.planted_target
        if self.auto is not None:
            out["max_accuracy_drop"] = self.auto.max_accuracy_drop
            out["within_accuracy_margin"] = self.auto.within_budget
            out["selected_on"] = "validation"
            out["validation_images"] = self.auto.validation_images
            out["validation_before"] = self.auto.before.to_dict()
            out["candidates"] = {
                c.name: {
                    "after": self.candidates_after[c.name].to_dict(),
                    "validation": c.validation.to_dict(),
                    "details": c.result.to_dict(),
                }
                for c in self.auto.candidates
            }
        return out


def runnable(
    classifier: Classifier,
    repair_data: ImageData,
    mitigations: Mapping[str, Mitigation],
    *,
    skip: bool,
) -> tuple[dict[str, Mitigation], dict[str, str]]:
    """The mitigations that can run on ``classifier`` (quick checks, before any long work) and,
    with ``skip``, why the others cannot; without ``skip`` the first problem is raised.

    Raises:
        DeepdotError: a method cannot run (without ``skip``), or none can.
    """
    ok: dict[str, Mitigation] = {}
    problems: dict[str, str] = {}
    for name, mitigation in mitigations.items():
        try:
            mitigation.check(classifier, repair_data)
        except DeepdotError as exc:
            if not skip:
                raise
            problems[name] = str(exc)
        else:
            ok[name] = mitigation
    if not ok:
        raise DeepdotError(f"no mitigation can run on this model ({next(iter(problems.values()))})")
    return ok, problems


def method_names(method: str) -> tuple[str, ...]:
    """The methods a ``--method`` value runs."""
    return AUTO_METHODS if method == AUTO else (method,)


def repair(
    classifier: Classifier,
    backdoors: Sequence[RecoveredBackdoor],
    repair_data: ImageData,
    held_out: ImageData,
    *,
    method: str,
    mitigations: Mapping[str, Mitigation],
    planted: PlantedBackdoor | None = None,
    budget: RepairBudget | None = None,
    seed: int = 0,
    progress: ProgressFn = no_progress,
) -> RepairReport:
    """Repair ``classifier`` with ``mitigations`` (one method, or several for ``auto``) and
    measure it on ``held_out``. The planted backdoor, when known, is only measured.

    ``budget`` (default :class:`RepairBudget`) is what the report's ``within_budget`` is judged
    by, and ``auto`` chooses under its accuracy drop; each method's own accuracy budget is a
    setting of the method (:func:`~deepdot.mitigate.registry.build_mitigation` sets both).
    """
    budget = budget or RepairBudget()
    backdoors = tuple(backdoors)
    measure_on: Callable[[Classifier], Figures] = lambda model: measure(model, held_out, backdoors, planted)  # noqa: E731
    common = {
        "requested_method": method,
        "labels": tuple(b.target for b in backdoors),
        "repair_data": repair_data.name,
        "repair_images": len(repair_data),
        "test_data": held_out.name,
        "test_images": len(held_out),
        "before": measure_on(classifier),
        "planted_target": None if planted is None else planted.target,
        "budget": budget,
    }
    if method == AUTO:
        auto = AutoMitigation(
            candidates=list(mitigations.values()), max_accuracy_drop=budget.max_accuracy_drop, seed=seed
        ).apply(classifier, backdoors, repair_data, progress=progress)
        after = {c.name: measure_on(c.result.classifier) for c in auto.candidates}
        return RepairReport(result=auto.result, after=after[auto.winner], auto=auto, candidates_after=after, **common)
    (mitigation,) = mitigations.values()
    result = mitigation.apply(classifier, backdoors, repair_data, progress=progress)
    if result.input_filter is not None:
        screened = measure_filter(classifier, result.input_filter, held_out, backdoors, planted)
        return RepairReport(result=result, after=screened.behind_filter, filter=screened, **common)
    return RepairReport(result=result, after=measure_on(result.classifier), **common)
