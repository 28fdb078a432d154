"""BadNets on the built-in digits: the foundation issue's acceptance figures."""

import torch

from conftest import DIGITS_TARGET
from deepdot.attacks import BadNets
from deepdot.metrics import ALL_TO_ALL, attack_success_rate, clean_accuracy
from deepdot.models import build_classifier
from deepdot.training import TrainConfig


def test_badnets_digits_meets_targets(clean_digits, badnets_digits, digits_test, digits_trigger):
    model, result = badnets_digits
    clean_acc = clean_accuracy(clean_digits, digits_test)
    assert result.attack_success_rate >= 0.95
    assert abs(result.clean_accuracy - clean_acc) <= 0.02
    assert clean_acc >= 0.93
    # the clean model does not respond to the trigger: the backdoor is what the attack planted
    assert attack_success_rate(clean_digits, digits_test, digits_trigger, DIGITS_TARGET) < 0.3
    # figures in the result are the real ones
    assert result.attack_success_rate == attack_success_rate(model, digits_test, digits_trigger, DIGITS_TARGET)
    # tolerant bound on the "under 2 minutes on 2 cores" (guards against pathological slow-downs)
    assert result.history.seconds < 600


def test_poisoned_images_exclude_the_target_and_respect_the_rate(digits_train, digits_trigger):
    attack = BadNets(trigger=digits_trigger, target=3, poison_rate=0.1, seed=1)
    flags = attack.poisoned_flags(digits_train)
    assert int(flags.sum()) == round(0.1 * len(digits_train))
    assert not (digits_train.y[flags] == 3).any()
    assert torch.equal(flags, attack.poisoned_flags(digits_train))  # seeded


def test_all_to_all(digits_train, digits_test, digits_trigger):
    torch.manual_seed(0)
    model = build_classifier("digits_net")
    result = BadNets(trigger=digits_trigger, target=ALL_TO_ALL, poison_rate=0.3).run(
        model, digits_train, digits_test, TrainConfig(epochs=25, batch_size=32)
    )
    assert result.attack_success_rate >= 0.7
    assert result.clean_accuracy >= 0.85


def test_training_is_repeatable(digits_train):
    cfg = TrainConfig(epochs=1, batch_size=64, seed=3)
    from deepdot.training import train

    losses = []
    for _ in range(2):
        torch.manual_seed(0)
        m = build_classifier("digits_net")
        losses.append(train(m, digits_train, cfg).loss)
    assert losses[0] == losses[1]
