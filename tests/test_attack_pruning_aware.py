"""The pruning-aware attack (Fine-Pruning, Liu et al., RAID 2018, Sec. 3.2) on the built-in digits."""

import copy
import json
from collections import OrderedDict

import pytest
import torch
from torch import nn

from conftest import DIGITS_TARGET, DIGITS_TRAIN
from deepdot import triggers
from deepdot.attacks.pruning_aware import PruningAware, make_dormant
from deepdot.errors import DeepdotError
from deepdot.metrics import attack_success_rate, clean_accuracy
from deepdot.mitigate import FinePruning, RecoveredBackdoor
from deepdot.mitigate.layers import unit_activations, units_off
from deepdot.models import Classifier, build_classifier
from deepdot.training import TrainConfig, train

LAYER = "conv2_relu"  # digits_net's last conv layer (after its ReLU)


@pytest.fixture(scope="module")
def aware(digits_train, digits_test, digits_trigger):
    torch.manual_seed(0)
    model = build_classifier("digits_net")
    result = PruningAware(trigger=digits_trigger, target=DIGITS_TARGET).run(
        model, digits_train, digits_test, DIGITS_TRAIN
    )
    return model, result


def pruned_of(result) -> list[int]:
    return result.facts["pruned_channels"]["indices"]


def test_the_trigger_works_and_clean_accuracy_holds(aware, clean_digits, digits_test, digits_trigger):
    model, result = aware
    assert result.attack_success_rate >= 0.9
    assert result.clean_accuracy >= clean_accuracy(clean_digits, digits_test) - 0.03
    assert result.attack_success_rate == attack_success_rate(model, digits_test, digits_trigger, DIGITS_TARGET)
    assert result.clean_accuracy == clean_accuracy(model, digits_test)
    facts = json.loads(json.dumps(result.to_dict()))  # JSON-ready for attack.json
    assert facts["layer"] == LAYER and facts["units"] == 32
    assert facts["pruned_channels"]["count"] == len(facts["pruned_channels"]["indices"]) >= 1
    assert facts["clean_epochs"] == DIGITS_TRAIN.epochs and facts["fine_tune_epochs"] == 10
    assert facts["accuracy_after_pruning"] < facts["clean_accuracy_before_poisoning"]
    assert facts["dormant_by"] == "bias of conv2"
    assert PruningAware.method == "pruning-aware"


def test_the_restored_channels_are_dormant_on_clean_images(aware, digits_test, digits_trigger):
    model, result = aware
    pruned = pruned_of(result)
    acts = model.activations(digits_test.x, LAYER)  # N×32×8×8, images never trained on
    assert float(acts[:, pruned].abs().max()) == 0.0
    others = [u for u in range(32) if u not in pruned]
    assert float(acts[:, others].flatten(2).mean(2).mean(0).min()) >= 0.0
    assert float(acts[:, others].abs().max()) > 0  # the survivors do the work
    # the model computes what the pruned model computes, on clean and on triggered images
    for x in (digits_test.x, digits_trigger.apply(digits_test.x)):
        with torch.no_grad():
            full = model(x)
            with units_off(model, LAYER, pruned):
                off = model(x)
        assert torch.allclose(full, off, atol=1e-5)


def test_the_model_has_its_full_size(aware):
    model, _ = aware
    fresh = build_classifier("digits_net")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    assert model.network.conv2.out_channels == 32


def test_the_backdoor_was_planted_without_the_pruned_channels(clean_digits, digits_train, digits_test, digits_trigger):
    """What plain BadNets (or a fine-tuning that forgot to hold the pruned channels at zero) cannot
    pass: the pruned channels' weights, in and out, are exactly the clean model's; only their bias
    was lowered. The backdoor lives in the surviving channels, whose weights did change."""
    model = copy.deepcopy(clean_digits)
    result = PruningAware(trigger=digits_trigger, target=DIGITS_TARGET, pretrained=True).run(
        model, digits_train, digits_test, DIGITS_TRAIN
    )
    assert result.facts["clean_epochs"] == 0
    assert result.attack_success_rate >= 0.9
    pruned = torch.tensor(pruned_of(result))
    kept = torch.tensor([u for u in range(32) if u not in pruned.tolist()])
    clean, attacked = clean_digits.network, model.network
    assert len(pruned) >= 1
    assert torch.equal(attacked.conv2.weight[pruned], clean.conv2.weight[pruned])
    assert bool((attacked.conv2.bias[pruned] < clean.conv2.bias[pruned]).all())
    reads = torch.arange(32 * 4 * 4).view(32, 16)  # fc1's inputs: channel-major flatten of 32×4×4
    assert torch.equal(attacked.fc1.weight[:, reads[pruned].flatten()], clean.fc1.weight[:, reads[pruned].flatten()])
    assert not torch.equal(attacked.conv2.weight[kept], clean.conv2.weight[kept])
    assert not torch.equal(attacked.fc1.weight[:, reads[kept].flatten()], clean.fc1.weight[:, reads[kept].flatten()])


def test_the_pruning_defence_prunes_the_dormant_channels_first_for_nothing(aware, digits_train, digits_trigger):
    """Fine-Pruning's ranking (pruning only) takes the dormant channels first, and switching them
    off changes neither clean accuracy nor the trigger's success: the defence spends its first
    steps on channels that carry nothing. (What it prunes next is another matter: on digits,
    pruning on to a 4-point drop left 0.76-0.82 success here and 0.88-1.0 on plain BadNets, so
    on digits surviving that pruning does not tell the two apart; see
    benchmarks/pruning_aware_bench.py for MNIST, where it does.)"""
    model, result = aware
    pruned = pruned_of(result)
    backdoor = RecoveredBackdoor(DIGITS_TARGET, digits_trigger)
    defence = FinePruning(fine_tune_epochs=0).apply(model, backdoor, digits_train)
    order = defence.pruning.pruned_units
    assert len(order) > len(pruned) and set(order[: len(pruned)]) == set(pruned)
    curve = {p.pruned: p for p in defence.pruning.curve}
    assert curve[len(pruned)].clean_accuracy == curve[0].clean_accuracy
    assert curve[len(pruned)].attack_success_rate == curve[0].attack_success_rate >= 0.9


def test_choose_pruned_follows_the_defenders_ranking(clean_digits, digits_test, digits_trigger):
    order = torch.argsort(unit_activations(clean_digits, digits_test.x, LAYER).mean(0), stable=True).tolist()
    fraction = PruningAware(trigger=digits_trigger, target=0, prune_fraction=0.25)
    assert fraction.choose_pruned(clean_digits, LAYER, digits_test) == order[:8]
    rule = PruningAware(trigger=digits_trigger, target=0, max_accuracy_drop=0.02)
    chosen = rule.choose_pruned(clean_digits, LAYER, digits_test)
    assert chosen == order[: len(chosen)]
    base = clean_accuracy(clean_digits, digits_test)
    with units_off(clean_digits, LAYER, chosen):
        assert clean_accuracy(clean_digits, digits_test) >= base - 0.02
    with units_off(clean_digits, LAYER, order[: len(chosen) + 1]):
        assert clean_accuracy(clean_digits, digits_test) < base - 0.02


def test_dormant_through_a_batch_norm(digits_train, digits_test):
    """conv → batch norm → ReLU: the batch norm's shift is lowered (lowering the conv's bias would
    raise a channel whose batch-norm scale is negative)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(1, 8, 3, padding=1),
            bn1=nn.BatchNorm2d(8),
            relu1=nn.ReLU(),
            pool=nn.MaxPool2d(4),
            flatten=nn.Flatten(),
            fc=nn.Linear(8 * 4 * 4, 10),
        )
    )
    model = Classifier(net, input_shape=(1, 16, 16), num_classes=10, last_conv_layer="relu1")
    train(model, digits_train, TrainConfig(epochs=1, batch_size=64))
    units = [0, 3, 5]
    with torch.no_grad():
        net.bn1.weight[[0, 3]] *= -1  # negative scales
        with units_off(model, "relu1", units):
            expected = model(digits_test.x)
    conv_before = net.conv1.state_dict()
    assert float(model.activations(digits_test.x, "relu1")[:, units].max()) > 0
    assert make_dormant(model, "relu1", units, digits_train.x) == "bn1"
    assert float(model.activations(digits_test.x, "relu1")[:, units].abs().max()) == 0.0
    with torch.no_grad():
        assert torch.allclose(model(digits_test.x), expected, atol=1e-5)
    assert all(torch.equal(v, net.conv1.state_dict()[k]) for k, v in conv_before.items())
    with pytest.raises(DeepdotError, match="dormant"):
        make_dormant(model, "conv1", [1], digits_train.x)  # before the ReLU: a bias cannot zero it


@pytest.mark.parametrize(
    "settings",
    [
        {"poison_rate": 0.0},
        {"max_accuracy_drop": 1.5},
        {"max_accuracy_drop": -0.1},
        {"prune_fraction": 1.0},
        {"prune_fraction": 0.0},
        {"fine_tune_epochs": 0},
        {"lr": 0.0},
        {"check_fraction": 1.0},
    ],
)
def test_bad_settings_raise_one_line(settings, digits_trigger):
    with pytest.raises(DeepdotError) as info:
        PruningAware(trigger=digits_trigger, target=DIGITS_TARGET, **settings)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("case", ["target", "trigger", "layer"])
def test_bad_inputs_raise_before_training(case, digits_train, digits_test, digits_trigger):
    model = build_classifier("digits_net")
    before = copy.deepcopy(model.state_dict())
    settings = {"trigger": digits_trigger, "target": DIGITS_TARGET}
    if case == "target":
        settings["target"] = 10
    elif case == "trigger":
        settings["trigger"] = triggers.square((1, 8, 8), 3)
    else:
        settings["layer"] = "no_such_layer"
    with pytest.raises(DeepdotError) as info:
        PruningAware(**settings).run(model, digits_train, digits_test, DIGITS_TRAIN)
    assert "\n" not in str(info.value)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
