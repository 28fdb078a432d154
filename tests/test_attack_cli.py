"""``deepdot attack --method``: every attack of the registry is reachable from the command line,
writes its own facts to attack.json, and bad settings end with exit 2 and one line."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from deepdot.attacks import ATTACKS, build_attack
from deepdot.cli import app
from deepdot.errors import DeepdotError


def _errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize(
    "args",
    [
        ["--method", "xiong-random", "--sampling-rate", "1.5"],
        ["--method", "xiong-random", "--mask-pixels", "100000"],
        ["--method", "badnets", "--clean-model", "nowhere"],
        ["--method", "trojan", "--retrain", "some"],
        ["--method", "nope"],
    ],
)
def test_bad_attack_settings_are_one_line(args, tmp_path):
    res = CliRunner().invoke(app, ["attack", "--data", "digits", "--epochs", "1", "--out", str(tmp_path), *args])
    assert res.exit_code == 2, res.output
    assert len(_errors(res.output)) == 1 or "Invalid value" in res.output


def test_the_registry_builds_every_attack(digits_trigger):
    for name in ATTACKS:
        attack = build_attack(name, target=3, trigger=digits_trigger, poison_rate=0.2, seed=1)
        assert attack.method == name and attack.target == 3
    with pytest.raises(DeepdotError, match="unknown attack"):
        build_attack("nope", target=3)
    with pytest.raises(DeepdotError, match="needs a trigger"):
        build_attack("badnets", target=3)


def test_attack_writes_the_method_and_its_facts(tmp_path):
    out = tmp_path / "xr"
    res = CliRunner().invoke(
        app,
        ["attack", "--method", "xiong-random", "--data", "digits", "--epochs", "2", "--mask-pixels", "12",
         "--sampling-rate", "0.8", "--out", str(out)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "attack.json").read_text())
    assert summary["method"] == "xiong-random" and summary["trigger"]["type"] == "xiong-random"
    assert summary["sampling_rate"] == 0.8 and summary["mask_pixels"] == 12
    assert summary["augmented_images"] > 0
    assert (out / "trigger.npz").exists() and summary["trigger"]["mask_l1"] == pytest.approx(12)
