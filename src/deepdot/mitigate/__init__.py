"""Removing a backdoor once a scan has found it: Neural Cleanse's input filter, neuron pruning and
unlearning (Wang et al., IEEE S&P 2019, Sec. VI), and fine-tuning / fine-pruning (Liu et al.,
RAID 2018).

Every mitigation holds its settings and is applied as
``Unlearning(epochs=1).apply(classifier, scan_result, clean_data) -> MitigationResult``; the
input classifier is never modified.
"""

from deepdot.mitigate.auto import AutoMitigation, AutoResult, Candidate
from deepdot.mitigate.base import Mitigation, MitigationError, RecoveredBackdoor, recovered_backdoors
from deepdot.mitigate.evaluation import (
    Figures,
    FilterFigures,
    PlantedBackdoor,
    choose_best,
    measure,
    measure_filter,
)
from deepdot.mitigate.filter import InputFilter, TriggerFilter
from deepdot.mitigate.fine_pruning import FinePruning, FineTuning
from deepdot.mitigate.pipeline import AUTO, RepairBudget, RepairReport, method_names, repair, runnable
from deepdot.mitigate.prune import NeuronPruning
from deepdot.mitigate.registry import AUTO_METHODS, METHODS, build_mitigation
from deepdot.mitigate.result import MitigationResult, PruningOutcome, PruningStep
from deepdot.mitigate.unlearn import Unlearning

__all__ = [
    "AUTO",
    "AUTO_METHODS",
    "METHODS",
    "AutoMitigation",
    "AutoResult",
    "Candidate",
    "RepairReport",
    "build_mitigation",
    "method_names",
    "repair",
    "RepairBudget",
    "runnable",
    "FilterFigures",
    "Figures",
    "FinePruning",
    "FineTuning",
    "InputFilter",
    "Mitigation",
    "MitigationError",
    "MitigationResult",
    "NeuronPruning",
    "PlantedBackdoor",
    "PruningOutcome",
    "PruningStep",
    "RecoveredBackdoor",
    "TriggerFilter",
    "Unlearning",
    "choose_best",
    "measure",
    "measure_filter",
    "recovered_backdoors",
]
