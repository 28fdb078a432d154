"""Shared fixtures: small deterministic models trained once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deepdot import triggers
from deepdot.attacks import BadNets
from deepdot.io import load_data
from deepdot.models import build_classifier
from deepdot.training import TrainConfig, train

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DIGITS_TARGET = 7
DIGITS_TRAIN = TrainConfig(epochs=30, batch_size=32, seed=0)


def shared(path: str) -> Path:
    """A file in ../shared/data, or skip the test (with the reason) when it is not there."""
    p = SHARED_DATA / path
    if not p.exists():
        pytest.skip(f"shared data not available: {p}")
    return p


@pytest.fixture(scope="session", autouse=True)
def _threads() -> None:
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def digits_train():
    return load_data("digits:train")


@pytest.fixture(scope="session")
def digits_test():
    return load_data("digits:test")


@pytest.fixture(scope="session")
def digits_trigger(digits_train):
    return triggers.square(digits_train.image_shape, 3, corner="bottom-right", margin=1)


@pytest.fixture(scope="session")
def clean_digits(digits_train):
    torch.manual_seed(0)
    model = build_classifier("digits_net")
    train(model, digits_train, DIGITS_TRAIN)
    return model


@pytest.fixture(scope="session")
def badnets_digits(digits_train, digits_test, digits_trigger):
    torch.manual_seed(0)
    model = build_classifier("digits_net")
    result = BadNets(trigger=digits_trigger, target=DIGITS_TARGET, poison_rate=0.1).run(
        model, digits_train, digits_test, DIGITS_TRAIN
    )
    return model, result


@pytest.fixture(scope="session")
def saved_models(tmp_path_factory, clean_digits, badnets_digits, digits_trigger):
    """The two digits models saved in deepdot's format: {'clean': dir, 'badnets': dir}."""
    from deepdot.io.files import save_trigger
    from deepdot.io.models import save_model

    root = tmp_path_factory.mktemp("models")
    save_model(clean_digits, root / "clean")
    save_model(badnets_digits[0], root / "badnets")
    save_trigger(digits_trigger, root / "badnets" / "trigger.npz")
    return {"clean": root / "clean", "badnets": root / "badnets"}


@pytest.fixture(scope="session")
def planted_scan_dir(tmp_path_factory, digits_trigger):
    """A scan folder as ``deepdot scan`` writes it, flagging the planted target, whose recovered
    trigger is the planted one (for mitigation tests that must not depend on a scan's result)."""
    from deepdot.io.files import save_png, write_json

    out = tmp_path_factory.mktemp("scan")
    write_json(out / "scan.json", {"infected": True, "flagged": [DIGITS_TARGET]})
    save_png(out / f"label_{DIGITS_TARGET}_mask.png", digits_trigger.mask)
    save_png(out / f"label_{DIGITS_TARGET}_pattern.png", digits_trigger.pattern)
    return out
