"""The Trojan attack (Liu et al., NDSS 2018) on the built-in digits: a trigger made for chosen
neurons, then retraining; its facts, its settings' errors, and that it is not BadNets in disguise."""

import copy
import json

import pytest
import torch
from torch import nn

from conftest import DIGITS_TARGET
from deepdot.attacks.trojan import NeuronProbe, Trojan
from deepdot.errors import DeepdotError
from deepdot.metrics import attack_success_rate, clean_accuracy
from deepdot.models import Classifier, build_classifier
from deepdot.training import TrainConfig

RETRAIN = TrainConfig(epochs=8, batch_size=32, seed=0)


def _attack(clean_model, attack, train, test, config=RETRAIN):
    model = copy.deepcopy(clean_model)
    return model, attack.run(model, train, test, config)


@pytest.fixture(scope="module")
def trojan_square(clean_digits, digits_train, digits_test):
    """The Trojan Square preset, retraining the whole model (retraining only the logit layer
    after the digits net's one hidden dense layer reaches ~70 %, see test_retrain_after...)."""
    return _attack(clean_digits, Trojan.square(target=DIGITS_TARGET, retrain="all"), digits_train, digits_test)


def _probe(model, result, data) -> NeuronProbe:
    return NeuronProbe(model, result.facts["layer"], result.trigger.mask, data.x)


def test_trojan_square_works_and_keeps_clean_accuracy(trojan_square, clean_digits, digits_test):
    model, result = trojan_square
    clean = clean_accuracy(clean_digits, digits_test)
    assert result.attack_success_rate >= 0.9
    assert abs(result.clean_accuracy - clean) <= 0.03
    assert result.facts["clean_accuracy_before"] == pytest.approx(clean)
    # the figures are the real ones, and the clean model does not answer the trigger
    assert result.attack_success_rate == attack_success_rate(model, digits_test, result.trigger, DIGITS_TARGET)
    assert attack_success_rate(clean_digits, digits_test, result.trigger, DIGITS_TARGET) < 0.3


def test_facts_are_recorded_and_json_ready(trojan_square):
    _, result = trojan_square
    facts = result.facts
    assert facts["layer"] == "fc1"  # digits_net's first fully connected layer
    assert len(facts["neurons"]) == 1 and all(isinstance(n, int) for n in facts["neurons"])
    assert facts["mask_pixels"] == 16  # round(sqrt(0.07 * 256)) = 4: a 4x4 square
    assert facts["trigger_area"] == pytest.approx(16 / 256)
    assert facts["retrain"] == "all" and facts["frozen_layers"] == []
    assert facts["shape"] == "square"
    assert result.trigger is not None and result.poisoned_images == -1
    record = json.loads(json.dumps(result.to_dict()))
    assert record["layer"] == "fc1" and "neuron_activation_after" in record


def test_trigger_optimisation_raised_the_chosen_neurons(trojan_square):
    facts = trojan_square[1].facts
    before, after, clean = (facts[f"neuron_activation_{k}"] for k in ("before", "after", "clean"))
    assert after > before + 2.0  # pre-activations of the digits net's fc1 spread by ~5-8
    assert after > clean + 2.0


def test_trigger_lives_only_inside_the_square(trojan_square, digits_test):
    trigger = trojan_square[1].trigger
    mask = trigger.mask
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert mask[11:15, 11:15].eq(1).all() and mask.sum() == 16  # bottom-right, one pixel in
    outside = mask == 0
    assert trigger.pattern[:, outside].abs().max() == 0
    stamped = trigger.apply(digits_test.x)
    assert torch.equal(stamped[..., outside], digits_test.x[..., outside])


def test_the_pattern_is_optimised_not_a_fixed_patch(trojan_square, clean_digits, digits_test):
    """Fails if the attack fell back to BadNets with a fixed pattern: the pattern is not one
    colour, and on the model it was made for it drives the chosen neuron harder than random
    patterns or flat fills of the same shape."""
    _, result = trojan_square
    neurons, mask, pattern = result.facts["neurons"], result.trigger.mask, result.trigger.pattern
    inside = mask > 0
    assert pattern[:, inside].std() > 0.05
    probe = _probe(clean_digits, result, digits_test)
    with torch.no_grad():
        made = probe.values(neurons, pattern).mean().item()
        g = torch.Generator().manual_seed(123)
        others = [torch.rand(pattern.shape, generator=g) * inside for _ in range(5)]
        others += [torch.full(pattern.shape, v) * inside for v in (0.0, 0.5)]
        beaten = [probe.values(neurons, p).mean().item() for p in others]
    assert made > max(beaten) + 1.0, (made, beaten)


def test_neuron_selection_follows_the_incoming_weights(trojan_square, clean_digits, digits_test):
    _, result = trojan_square
    strength = clean_digits.network.fc1.weight.detach().abs().sum(1)
    top = torch.argsort(strength, descending=True)
    assert result.facts["candidates"] == top[:8].tolist()
    assert set(result.facts["neurons"]) <= set(result.facts["candidates"])
    # candidates=1: the paper's rule alone, the strongest-connected neuron
    probe = _probe(clean_digits, result, digits_test)
    neurons, info = Trojan.square(target=DIGITS_TARGET, candidates=1, neurons=2).select_neurons(probe)
    assert neurons == top[:2].tolist() and "candidate_drive" not in info


def test_retrain_after_keeps_the_layers_up_to_the_chosen_one(clean_digits, digits_train, digits_test):
    attack = Trojan.square(target=DIGITS_TARGET, retrain_epochs=4)  # the paper's default: retrain after
    model, result = _attack(clean_digits, attack, digits_train, digits_test)
    assert result.facts["layer"] == "fc1" and result.facts["frozen_layers"] == ["conv1", "conv2", "fc1"]
    before, after = clean_digits.state_dict(), model.state_dict()
    for name in before:
        same = torch.equal(before[name], after[name])
        assert same == (not name.startswith("network.fc2")), name
    assert result.facts["retrained_parameters"] == 64 * 10 + 10
    # only the logit layer learnt the backdoor: weaker than retraining all, but clearly there
    baseline = attack_success_rate(clean_digits, digits_test, result.trigger, DIGITS_TARGET)
    assert result.attack_success_rate > baseline + 0.3


def test_trojan_watermark(clean_digits, digits_train, digits_test):
    mask = torch.zeros(16, 16)
    mask[2, 2:14] = 1.0  # a thin "7"-less stroke across the top and down the right: ~7 %
    mask[3:8, 13] = 1.0
    attack = Trojan.watermark(mask, target=DIGITS_TARGET, retrain="all")
    model, result = _attack(clean_digits, attack, digits_train, digits_test)
    assert result.facts["shape"] == "watermark" and result.facts["mask_pixels"] == 17
    assert result.facts["trigger_area"] == pytest.approx(17 / 256)
    assert torch.equal(result.trigger.mask, mask)
    assert result.trigger.pattern[:, mask == 0].abs().max() == 0
    assert result.attack_success_rate >= 0.9
    assert abs(result.clean_accuracy - clean_accuracy(clean_digits, digits_test)) <= 0.03


def test_pretrain_trains_an_untrained_model_first(digits_train, digits_test):
    torch.manual_seed(0)
    model = build_classifier("digits_net")
    attack = Trojan.square(target=DIGITS_TARGET, pretrain=True, retrain="all", candidates=1, trigger_steps=20)
    result = attack.run(model, digits_train, digits_test, TrainConfig(epochs=3, batch_size=32))
    assert result.facts["clean_accuracy_before"] > 0.5  # an untrained net is at ~0.1


def _one_line_error(make, match: str) -> None:
    with pytest.raises(DeepdotError, match=match) as info:
        make()
    assert "\n" not in str(info.value)


def test_bad_settings_raise_one_line(clean_digits, digits_train, digits_test):
    def run(attack, model=None):
        return lambda: attack.run(model or copy.deepcopy(clean_digits), digits_train, digits_test, RETRAIN)

    _one_line_error(run(Trojan.square(target=7, layer="nope")), "no layer named 'nope'")
    _one_line_error(run(Trojan.square(target=7, layer="fc1_relu")), "no dense or conv layer")
    _one_line_error(run(Trojan.square(target=7, layer="fc2")), "nothing runs after layer 'fc2'")
    convs = nn.Sequential(nn.Conv2d(1, 10, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    _one_line_error(
        run(Trojan.square(target=7), Classifier(convs, input_shape=(1, 16, 16), num_classes=10)),
        "needs a hidden fully connected layer",
    )
    logits_only = nn.Sequential(nn.Flatten(), nn.Linear(256, 10))
    _one_line_error(
        run(Trojan.square(target=7), Classifier(logits_only, input_shape=(1, 16, 16), num_classes=10)),
        "only the output layer",
    )
    _one_line_error(
        run(Trojan.watermark(torch.full((8, 8), 0.1), target=7)), "watermark mask is 8x8 but the images are 16x16"
    )
    _one_line_error(run(Trojan.square(target=10)), "target label 10 is outside 0..9")
    _one_line_error(lambda: Trojan.square(target=-1), "one label")
    _one_line_error(lambda: Trojan.square(target=7, area=0.8), "trigger area")
    _one_line_error(lambda: Trojan.square(target=7, area=0.0), "trigger area")
    _one_line_error(lambda: Trojan.watermark(torch.ones(16, 16), target=7), "watermark covers 100.0%")
    _one_line_error(lambda: Trojan.watermark(torch.zeros(16, 16), target=7), "watermark covers 0.0%")
    _one_line_error(lambda: Trojan.watermark(torch.full((16, 16), 2.0), target=7), r"\[0, 1\]")
    _one_line_error(lambda: Trojan(target=7, shape="watermark"), "needs its mask")
    _one_line_error(lambda: Trojan(target=7, watermark_mask=torch.zeros(16, 16)), "use shape='watermark'")
    _one_line_error(lambda: Trojan.square(target=7, retrain="some"), "unknown retrain")
    _one_line_error(lambda: Trojan(target=7, shape="circle"), "unknown shape")
    _one_line_error(lambda: Trojan.square(target=7, neurons=0), "must be >= 1")
    _one_line_error(lambda: Trojan.square(target=7, poison_fraction=1.0), "poison fraction")
    _one_line_error(lambda: Trojan.square(target=7, corner="middle"), "unknown corner")
