"""The one list of mitigation methods: their names (``deepdot mitigate --method``), classes, the
ones ``auto`` tries, and how common overrides map onto each class's settings.

The command line, :class:`~deepdot.mitigate.auto.AutoMitigation` and the benchmarks all build
mitigations through :func:`build_mitigation`.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from deepdot.mitigate.base import Mitigation, MitigationError
from deepdot.mitigate.filter import InputFilter
from deepdot.mitigate.fine_pruning import FinePruning, FineTuning
from deepdot.mitigate.prune import NeuronPruning
from deepdot.mitigate.unlearn import Unlearning

#: method name -> class
METHODS: dict[str, type[Mitigation]] = {
    "filter": InputFilter,
    "prune": NeuronPruning,
    "unlearn": Unlearning,
    "fine-tune": FineTuning,
    "fine-prune": FinePruning,
}

#: the methods ``auto`` tries, in order of preference on ties
AUTO_METHODS = ("unlearn", "fine-prune", "prune", "fine-tune")


def build_mitigation(
    name: str,
    *,
    layer: str | None = None,
    epochs: int | None = None,
    lr: float | None = None,
    false_positive_rate: float | None = None,
    max_accuracy_drop: float | None = None,
    seed: int | None = None,
) -> Mitigation:
    """The mitigation called ``name`` with the given overrides; ``None`` keeps a default, and an
    override a method has no setting for is ignored (``lr`` for the filter, ``layer`` for
    unlearning). ``epochs`` is the fine-tuning a method does: ``epochs`` for unlearning and
    fine-tuning, ``fine_tune_epochs`` for the pruning methods. ``max_accuracy_drop`` is every
    model-changing method's ``accuracy_budget`` (``deepdot mitigate --max-accuracy-drop``; the
    pruning methods' own ``max_accuracy_drop`` is a search margin, left at its default).

    Raises:
        MitigationError: an unknown name, or a value the method refuses.
    """
    if name not in METHODS:
        raise MitigationError(f"unknown mitigation {name!r}; choose one of {', '.join(METHODS)}")
    cls = METHODS[name]
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    wanted: dict[str, Any] = {
        "layer": layer,
        "fine_tune_epochs" if "fine_tune_epochs" in names else "epochs": epochs,
        "lr": lr,
        "false_positive_rate": false_positive_rate,
        "accuracy_budget": max_accuracy_drop,
        "seed": seed,
    }
    return cls(**{k: v for k, v in wanted.items() if v is not None and k in names})
