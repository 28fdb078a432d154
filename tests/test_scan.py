"""Neural Cleanse on digits: a planted target is flagged, a clean model is not."""

import pytest
import torch

from conftest import DIGITS_TARGET
from deepdot.scan import FastNeuralCleanse, NeuralCleanse, PreprocessingMismatch
from deepdot.scan.schedule import CostSchedule
from deepdot.triggers import mask_iou


@pytest.fixture(scope="module")
def fast_results(clean_digits, badnets_digits, digits_test):
    scanner = FastNeuralCleanse()
    return scanner.scan(clean_digits, digits_test), scanner.scan(badnets_digits[0], digits_test)


def test_fast_scan_flags_exactly_the_planted_target(fast_results, digits_trigger):
    clean, infected = fast_results
    assert infected.flagged == (DIGITS_TARGET,)
    assert infected.outliers.anomaly_index > 2
    recovered = infected.trigger_for(DIGITS_TARGET)
    assert recovered.mask_l1 < 15  # planted: 9 pixels
    # the recovered mask sits on the planted square (within a pixel: pooling makes the network
    # tolerant to small shifts of the patch)
    near = torch.nn.functional.max_pool2d(digits_trigger.mask[None, None], 3, stride=1, padding=1)[0, 0]
    assert float((recovered.mask * near).sum() / recovered.mask.sum()) > 0.8
    assert mask_iou(recovered.mask, digits_trigger.mask) > 0.1
    assert clean.flagged == () and clean.outliers.anomaly_index < 2
    assert not clean.infected and infected.infected


def test_scan_result_bookkeeping(fast_results):
    _, infected = fast_results
    d = infected.to_dict()
    assert [row["label"] for row in d["labels"]] == list(range(10))
    assert d["image_passes"] == sum(row["image_passes"] for row in d["labels"]) > 0
    assert {"median", "mad", "anomaly_index", "flagged", "infected", "seconds"} <= set(d)
    target_row = d["labels"][DIGITS_TARGET]
    assert target_row["attack_success_rate"] >= 0.99 and target_row["reached_threshold"]


def test_faithful_scan_on_a_few_labels(badnets_digits, digits_test):
    """The reference algorithm, run label by label with small settings, finds the same outlier."""
    scanner = NeuralCleanse(steps=60, samples_per_step=128, batch_size=32)
    result = scanner.scan(badnets_digits[0], digits_test, labels=[0, 2, 4, 5, 7, 9], suspected=[7])
    assert [t.label for t in result.labels] == [7, 0, 2, 4, 5, 9]
    assert result.flagged == (DIGITS_TARGET,)
    assert result.image_passes == sum(t.steps for t in result.labels) * 128


def test_scans_are_repeatable_and_resume_to_the_same_result(badnets_digits, digits_test):
    model = badnets_digits[0]
    fast = FastNeuralCleanse(steps=12, warmup_steps=6, images_per_step=32)
    one, two = fast.scan(model, digits_test), fast.scan(model, digits_test)
    assert [t.mask_l1 for t in one.labels] == [t.mask_l1 for t in two.labels]
    # a faithful scan given label 1 from an earlier run (a checkpoint) redoes only the others,
    # and each label's result does not depend on what ran before it
    faithful = NeuralCleanse(steps=3, samples_per_step=32)
    a = faithful.scan(model, digits_test, labels=[1, 3, 7])
    b = faithful.scan(model, digits_test, labels=[1, 3, 7], done={1: a.labels[0]})
    assert [t.mask_l1 for t in a.labels] == [t.mask_l1 for t in b.labels]
    assert b.image_passes == a.image_passes


def test_preprocessing_mismatch_stops_the_scan(badnets_digits, digits_test):
    from deepdot.models import Classifier

    model = badnets_digits[0]
    wrong = Classifier(
        model.network, input_shape=model.input_shape, num_classes=10, preprocess={"mean": [1.0], "std": [1.0]}
    )
    with pytest.raises(PreprocessingMismatch, match="preprocessing mismatch") as caught:
        FastNeuralCleanse(steps=5).scan(wrong, digits_test)
    assert "preprocess" in caught.value.settings  # the command line names its flag


def test_reference_cost_schedule():
    s = CostSchedule(1, init_cost=1e-3, patience=5, multiplier=2.0, threshold=0.99, dtype=torch.float64)
    row = torch.tensor([0])

    def step(success: float) -> None:
        s.update(row, torch.tensor([success], dtype=torch.float64))

    for _ in range(5):
        step(1.0)
    assert float(s.cost[0]) == 1e-3 and not bool(s.up_flag[0])
    for _ in range(5):
        step(1.0)
    assert float(s.cost[0]) == 2e-3 and bool(s.up_flag[0])
    for _ in range(5):
        step(0.5)
    assert float(s.cost[0]) == pytest.approx(2e-3 / 2**1.5) and bool(s.down_flag[0])


def test_frozen_labels_do_not_move(badnets_digits, digits_test):
    """The per-row Adam leaves stopped labels exactly where they stopped."""
    from deepdot.scan.fast import _RowAdam

    p = torch.zeros(3, 2)
    opt = _RowAdam((p,), lr=0.1, betas=(0.5, 0.9))
    opt.step(torch.tensor([0, 2]), (torch.ones(2, 2),))
    opt.step(torch.tensor([0]), (torch.ones(1, 2),))
    assert torch.all(p[1] == 0) and torch.all(p[0] < p[2]) and torch.all(p[2] < 0)
