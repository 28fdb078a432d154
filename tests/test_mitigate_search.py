"""The mitigation internals: one pruning search specialised by hooks (ranking, stop rule, how many
units to keep), ``_run`` returning the repaired model and its facts, and ``apply`` building the
result once. Fast: an untrained ``digits_net`` and a few hundred ``digits:test`` images."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from conftest import DIGITS_TARGET
from deepdot.mitigate import (
    FinePruning,
    InputFilter,
    Mitigation,
    MitigationResult,
    NeuronPruning,
    PruningStep,
    RecoveredBackdoor,
)
from deepdot.mitigate.base import Repaired
from deepdot.mitigate.layers import unit_activations, units_off
from deepdot.mitigate.search import PruningSearch
from deepdot.models import build_classifier


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_classifier("digits_net")


@pytest.fixture(scope="module")
def data(digits_test):
    return digits_test.take(300, seed=0)


@pytest.fixture(scope="module")
def backdoor(digits_trigger):
    return RecoveredBackdoor(DIGITS_TARGET, digits_trigger)


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _curve(*points: tuple[float, float, float]) -> list[PruningStep]:
    """A curve from (clean accuracy, gross success, net success) per step of one unit."""
    return [PruningStep(i, i / 10, acc, gross, net) for i, (acc, gross, net) in enumerate(points)]


def _searched(method, curve):
    """Run a pruning method's stop rule over ``curve`` step by step as the search does: the curve
    drawn and the number of units kept."""
    for end in range(2, len(curve) + 1):
        if method._stop(curve[:end]):
            return curve[:end], method._keep(curve[:end])
    return curve, method._keep(curve)


def test_neuron_pruning_keeps_the_last_step_within_the_margin_after_the_trigger_fails():
    method = NeuronPruning(target_attack_success=0.01, max_accuracy_drop=0.05, accuracy_budget=0.2)
    # fails at 2, accuracy leaves the margin at 4: 3 is kept
    curve = _curve((0.9, 1, 1), (0.9, 0.5, 0.5), (0.89, 0.0, 0.0), (0.87, 0.0, 0.0), (0.8, 0.0, 0.0), (0.9, 0, 0))
    drawn, keep = _searched(method, curve)
    assert (len(drawn), keep) == (5, 3)
    # the failing step is already out of the margin (not of the budget): it is kept all the same
    curve = _curve((0.9, 1, 1), (0.84, 0.0, 0.0), (0.83, 0.0, 0.0))
    assert _searched(method, curve) == (curve[:2], 1)
    # never fails: the step with the least success within the budget stays pruned
    curve = _curve((0.9, 1, 1), (0.9, 0.5, 0.5), (0.75, 0.2, 0.2), (0.5, 0.1, 0.1))
    assert _searched(method, curve) == (curve, 2)


def test_neuron_pruning_never_keeps_a_step_outside_the_accuracy_budget():
    method = NeuronPruning(target_attack_success=0.01, max_accuracy_drop=0.005, accuracy_budget=0.01)
    # the trigger would fail at 3, but step 2 already left the budget: the search stops there and
    # keeps step 1, the least success within the budget (the digits replica's case, where pruning
    # to the failure cost 12 points of clean accuracy)
    curve = _curve((0.97, 1, 1), (0.965, 0.6, 0.6), (0.95, 0.3, 0.3), (0.85, 0.0, 0.0))
    assert _searched(method, curve) == (curve[:3], 1)
    # nothing helps within the budget: nothing is pruned
    curve = _curve((0.97, 1, 1), (0.9, 0.0, 0.0))
    assert _searched(method, curve) == (curve, 0)


def test_neuron_pruning_rules_of_the_paper_and_of_gross_success():
    curve = _curve((0.9, 0.0, 0.0), (0.9, 0.5, 0.0), (0.9, 0.0, 0.0), (0.9, 0.0, 0.0))
    # the unpruned point never counts as the failure; net success fails at 1, gross at 2
    assert _searched(NeuronPruning(max_accuracy_drop=None), curve) == (curve[:2], 1)
    assert _searched(NeuronPruning(max_accuracy_drop=None, net_of_errors=False), curve) == (curve[:3], 2)
    # with a margin nothing leaves it: the whole curve is drawn and kept
    assert _searched(NeuronPruning(), curve) == (curve, 3)


def test_fine_pruning_keeps_the_last_step_within_the_accuracy_margin():
    method = FinePruning(max_accuracy_drop=0.04)
    curve = _curve((0.9, 1, 1), (0.9, 1, 1), (0.87, 1, 1), (0.85, 1, 1), (0.9, 1, 1))
    assert _searched(method, curve) == (curve[:4], 2)
    curve = _curve((0.9, 1, 1), (0.5, 1, 1))
    assert _searched(method, curve) == (curve, 0)


@dataclass(frozen=True, kw_only=True)
class LastUnitsFirst(PruningSearch):
    """A pruning search with a fixed ranking (the highest unit index first) that stops after a
    given number of steps and keeps a given number of units."""

    method = "last-first"

    steps: int = 3
    keep: int = 5
    seen: list[int] = field(default_factory=list)
    layer: str = "last_conv"
    max_fraction: float = 1.0
    step_fraction: float = 0.1
    fine_tune_epochs: int = 0
    lr: float = 1e-3
    accuracy_budget: float = 0.01
    lr_factors: tuple[float, ...] = (1.0, 0.25)
    batch_size: int = 32
    max_images: int = 300
    seed: int = 0

    def _rank(self, classifier, layer, data, backdoors):
        return torch.arange(unit_activations(classifier, data.x[:1], layer).shape[1]).flip(0)

    def _stop(self, curve):
        self.seen.append(len(curve))
        return len(curve) > self.steps

    def _keep(self, curve):
        return self.keep


def test_search_prunes_in_the_ranking_order_and_bakes_what_it_keeps(model, data, backdoor):
    method = LastUnitsFirst()
    events = []
    before = _weights(model)
    result = method.apply(model, backdoor, data, progress=events.append)
    outcome = result.pruning
    # conv2 has 32 channels: steps of 3, asked after each one, never about the unpruned model alone
    assert outcome.layer == "conv2_relu" and outcome.units == 32
    assert method.seen == [2, 3, 4]
    assert [p.pruned for p in outcome.curve] == [0, 3, 6, 9]
    assert outcome.pruned_units == (31, 30, 29, 28, 27)
    assert [(e.stage, e.done, e.total) for e in events] == [("last-first", i, 11) for i in (1, 2, 3)]
    assert result.training_loss == () and result.input_filter is None
    # the kept units are baked into the copy's weights; the input model is untouched
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with units_off(model, "conv2_relu", list(outcome.pruned_units)):
        expected = model.predict(data.x)
    assert torch.equal(result.classifier.predict(data.x), expected)


def test_search_fine_tunes_with_the_kept_units_held_off(model, data, backdoor):
    result = LastUnitsFirst(fine_tune_epochs=1, accuracy_budget=0.5).apply(model, backdoor, data)
    assert len(result.training_loss) >= 1 and result.fine_tuning is not None
    acts = unit_activations(result.classifier, data.x, "conv2_relu")
    assert torch.all(acts[:, list(result.pruning.pruned_units)] == 0)


GIVEN: list = []  # the models Recorder._run was given


@dataclass(frozen=True, kw_only=True)
class Recorder(Mitigation):
    """A mitigation that records the model ``_run`` was given and changes nothing."""

    method = "record"

    strength: float = 0.5

    def _run(self, classifier, backdoors, clean_data, progress):
        GIVEN.append(classifier)
        return Repaired(classifier, training_loss=(self.strength,))


def test_apply_gives_run_a_copy_in_eval_mode_and_builds_the_result(model, data, backdoor):
    GIVEN.clear()
    model.train()
    result = Recorder().apply(model, [backdoor, RecoveredBackdoor(3, backdoor.trigger)], data)
    (given,) = GIVEN
    assert isinstance(result, MitigationResult)
    assert given is not model and not given.training and model.training
    assert result.classifier is given
    assert (result.method, result.targets, result.training_loss) == ("record", (DIGITS_TARGET, 3), (0.5,))
    assert result.settings == {"strength": 0.5} and result.seconds >= 0
    assert result.pruning is None and result.input_filter is None


def test_input_filter_returns_the_model_it_was_given(model, data, backdoor):
    model.train()
    before = _weights(model)
    result = InputFilter().apply(model, backdoor, data)
    assert result.classifier is model
    assert model.training  # not even its mode was changed
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert result.targets == result.input_filter.targets == (DIGITS_TARGET,)
    assert result.to_dict()["filter"]["layer"] == "fc1_relu"
