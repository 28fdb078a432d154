"""A repair never ships a model it broke: every model-changing method fine-tunes under an
accuracy budget (:mod:`deepdot.mitigate.guard`), and ``repair`` / ``deepdot mitigate`` say when a
repair is not within its budget (``within_budget: false``, exit code 3) instead of passing a
broken or still-backdoored model off as repaired.

The models are the session's BadNets digits model (target 7) and its planted trigger, used as the
"recovered" trigger so no scan is needed.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import DIGITS_TARGET
from deepdot.cli import app
from deepdot.mitigate import (
    FineTuning,
    InputFilter,
    RecoveredBackdoor,
    RepairBudget,
    Unlearning,
    build_mitigation,
    repair,
)
from deepdot.mitigate.base import copy_classifier
from deepdot.mitigate.evaluation import Figures, FilterFigures
from deepdot.mitigate.guard import EpochGuard, train_within_budget
from deepdot.training import TrainConfig


@pytest.fixture(scope="module")
def backdoor(digits_trigger):
    return RecoveredBackdoor(DIGITS_TARGET, digits_trigger)


@pytest.fixture(scope="module")
def parts(digits_train):
    return digits_train.split(0.2, seed=0)


def _same_weights(a, b):
    return all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_an_absurd_learning_rate_leaves_the_model_as_it_was(badnets_digits, backdoor, digits_train):
    """Fine-tuning at lr 1.0 wrecks digits_net in one epoch; the guard keeps the starting weights
    (the only point within the budget) and the result says nothing was gained."""
    model = badnets_digits[0]
    result = FineTuning(lr=1.0, epochs=1, lr_factors=(1.0,)).apply(model, backdoor, digits_train)
    guarded = result.fine_tuning
    assert guarded is not None and len(guarded.points) == 2
    wrecked = guarded.points[1]
    assert wrecked.clean_accuracy < guarded.points[0].clean_accuracy - 0.2, "lr 1.0 should have broken the model"
    assert guarded.kept == guarded.points[0] and guarded.kept.epochs == 0 and guarded.within_budget
    assert _same_weights(result.classifier, model)
    assert json.loads(json.dumps(result.to_dict()))["fine_tuning"]["kept"]["epochs"] == 0


def test_a_lower_rate_is_tried_when_the_first_gets_nowhere(badnets_digits, backdoor, parts):
    """lr 1.0 breaks the model, then 1.0 x 5e-4 unlearns within the budget: the kept weights are
    from the second rate and the points record both."""
    model = badnets_digits[0]
    train_part, check = parts
    copy = copy_classifier(model)
    guarded = train_within_budget(
        copy,
        train_part,
        check,
        TrainConfig(epochs=2, batch_size=32, lr=1.0),
        [backdoor],
        max_accuracy_drop=0.02,
        target_attack_success=0.05,
        lr_factors=(1.0, 5e-4),
        batch_transform=_stamp_a_fifth(backdoor),
        progress=lambda _e: None,
    )
    assert {p.lr for p in guarded.points} == {0.0, 1.0, 5e-4}
    assert guarded.kept.lr == pytest.approx(5e-4) and guarded.within_budget
    assert guarded.kept.attack_success_rate <= 0.05
    assert guarded.kept.clean_accuracy >= guarded.points[0].clean_accuracy - 0.02


def _stamp_a_fifth(backdoor):
    def stamp(x, y, _index):
        x = x.clone()
        x[::5] = backdoor.trigger.apply(x[::5])
        return x, y

    return stamp


def test_the_guard_counts_the_budget_from_a_reference(badnets_digits, backdoor, digits_test):
    """A pruned model measured against the unpruned model's accuracy starts outside the budget;
    until an epoch gets back within it the most accurate point is kept and ``done`` is False."""
    guard = EpochGuard(
        badnets_digits[0],
        digits_test,
        [backdoor],
        max_accuracy_drop=0.01,
        target_attack_success=1.0,
        reference_accuracy=1.5,  # unreachable
    )
    assert not guard.within(guard.best) and not guard.done
    assert not guard(1)  # same weights again: still outside, still not done


def test_budget_rules_for_model_repairs_and_the_filter():
    budget = RepairBudget(max_accuracy_drop=0.01, max_attack_success=0.05)
    before = Figures(0.97, 0.98)
    assert budget.met(before, Figures(0.965, 0.05))
    assert not budget.met(before, Figures(0.955, 0.0)), "lost 1.5 points"
    assert not budget.met(before, Figures(0.97, 0.06)), "trigger still works"
    # the filter: its cost is the clean images it rejects beyond its calibration
    screened = FilterFigures(0.055, 0.01, None, Figures(0.91, 0.01))
    assert budget.met(before, screened.behind_filter, screened, calibrated_for=0.05)
    worse = FilterFigures(0.07, 0.01, None, Figures(0.90, 0.01))
    assert not budget.met(before, worse.behind_filter, worse, calibrated_for=0.05)
    with pytest.raises(Exception, match="budget"):
        RepairBudget(max_accuracy_drop=1.5)


def test_repair_reports_whether_it_is_within_budget(badnets_digits, backdoor, parts, digits_test):
    """The verdict is the budget's rule applied to the held-out figures the report shows."""
    model = badnets_digits[0]
    repair_set, _ = parts
    unlearn = {"unlearn": Unlearning()}
    report = repair(model, [backdoor], repair_set, digits_test, method="unlearn", mitigations=unlearn)
    out = report.to_dict()
    assert out["budget"] == {"max_accuracy_drop": 0.01, "max_attack_success": 0.05}
    assert out["within_budget"] is report.within_budget is RepairBudget().met(report.before, report.after)
    assert report.after.attack_success_rate <= 0.05 < report.before.attack_success_rate
    # the same repair judged by a budget it cannot meet (no attack success at all) says so ...
    strict = repair(
        model, [backdoor], repair_set, digits_test, method="unlearn", mitigations=unlearn,
        budget=RepairBudget(max_attack_success=0.0),
    )  # fmt: skip
    assert strict.after.attack_success_rate > 0 and strict.to_dict()["within_budget"] is False
    # ... and a lax one is met
    lax = RepairBudget(max_accuracy_drop=0.2, max_attack_success=0.2)
    assert repair(
        model, [backdoor], repair_set, digits_test, method="unlearn", mitigations=unlearn, budget=lax
    ).within_budget


def test_the_cli_budget_reaches_every_method():
    for name in ("prune", "fine-prune", "unlearn", "fine-tune"):
        assert build_mitigation(name, max_accuracy_drop=0.02).accuracy_budget == 0.02
    assert not hasattr(build_mitigation("filter", max_accuracy_drop=0.02), "accuracy_budget")
    assert isinstance(build_mitigation("filter"), InputFilter)


def test_mitigate_exits_3_when_not_within_budget(saved_models, planted_scan_dir, tmp_path):
    """``--method prune`` on the digits model cannot stop the trigger within a 1-point budget
    (pruning to that point costs ~10 points): exit 3, ``within_budget: false``, and the model
    written kept its accuracy. Unlearning can, within 3 points (the repair data of ``--data
    digits`` is the model's own training data, on which no accuracy loss shows before the
    held-out test): exit 0."""
    args = ["mitigate", str(saved_models["badnets"]), "--scan", str(planted_scan_dir), "--data", "digits"]
    res = CliRunner().invoke(app, [*args, "--method", "prune", "--out", str(tmp_path / "prune")])
    assert res.exit_code == 3, res.output
    assert "NOT within budget" in res.output
    summary = json.loads((tmp_path / "prune" / "mitigation.json").read_text())
    assert summary["within_budget"] is False
    assert summary["after"]["clean_accuracy"] >= summary["before"]["clean_accuracy"] - 0.01
    res = CliRunner().invoke(
        app, [*args, "--method", "unlearn", "--max-accuracy-drop", "0.03", "--out", str(tmp_path / "unlearn")]
    )
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "unlearn" / "mitigation.json").read_text())
    assert summary["within_budget"] is True and summary["after"]["attack_success_rate"] <= 0.05
