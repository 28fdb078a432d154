"""A scan folder as data: the exact triggers travel from the scan to the repair."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from deepdot.cli import app
from deepdot.errors import DeepdotError
from deepdot.io.scans import PNG_NOTE, TRIGGERS, load_recovered, load_scan
from deepdot.scan import FastNeuralCleanse

runner = CliRunner()


@pytest.fixture(scope="module")
def scanned(badnets_digits, digits_test, tmp_path_factory):
    """A short scan of the digits replica, written as `deepdot scan` writes it."""
    from deepdot.report.artifacts import write_scan

    result = FastNeuralCleanse(steps=40, warmup_steps=30).scan(badnets_digits[0], digits_test)
    out = tmp_path_factory.mktemp("scan")
    write_scan(out, result, {"model": "digits replica"})
    return result, out


def test_a_saved_scan_loads_back_exactly(scanned):
    result, out = scanned
    loaded = load_scan(out, (1, 16, 16))
    assert loaded.to_dict() == result.to_dict()
    for a, b in zip(loaded.labels, result.labels, strict=True):
        assert torch.equal(a.trigger.mask, b.trigger.mask) and torch.equal(a.trigger.pattern, b.trigger.pattern)
    assert loaded.warnings == result.warnings and PNG_NOTE not in loaded.warnings


def test_mitigate_reads_the_float_triggers_not_the_pictures(scanned, saved_models, tmp_path, monkeypatch):
    result, out = scanned
    assert 7 in result.flagged
    import deepdot.io.files as files

    def no_pictures(*args, **kwargs):
        raise AssertionError("the repair read a PNG although triggers.safetensors is there")

    monkeypatch.setattr(files, "read_png", no_pictures)
    labels, backdoors = load_recovered(out, (1, 16, 16))
    assert labels == list(result.flagged)
    assert torch.equal(backdoors[0].trigger.mask, result.trigger_for(labels[0]).mask)
    fixed = tmp_path / "fixed"
    run = runner.invoke(
        app,
        ["mitigate", str(saved_models["badnets"]), "--scan", str(out), "--data", "digits", "--method", "unlearn",
         "--epochs", "1", "--out", str(fixed)],
    )  # fmt: skip
    summary = json.loads((fixed / "mitigation.json").read_text())
    assert summary["method"] == "unlearn"
    assert run.exit_code == (0 if summary["within_budget"] else 3), run.output


def test_an_old_scan_folder_still_works_with_a_note(planted_scan_dir, digits_trigger):
    loaded = load_scan(planted_scan_dir, (1, 16, 16))
    assert PNG_NOTE in loaded.warnings
    assert loaded.flagged == (7,)
    # the 8-bit copy of the planted square is the square
    assert torch.allclose(loaded.trigger_for(7).mask, digits_trigger.mask, atol=1 / 255)


@pytest.mark.parametrize("damage", ["truncated", "foreign entry", "missing pattern"])
def test_a_damaged_triggers_file_is_one_line(scanned, tmp_path, damage):
    from safetensors.torch import save_file

    _, out = scanned
    folder = tmp_path / "scan"
    folder.mkdir()
    (folder / "scan.json").write_text((out / "scan.json").read_text())
    original = (out / TRIGGERS).read_bytes()
    if damage == "truncated":
        (folder / TRIGGERS).write_bytes(original[: len(original) // 2])
    elif damage == "foreign entry":
        save_file({"weights": torch.zeros(2)}, str(folder / TRIGGERS))
    else:
        save_file({"label_7.mask": torch.zeros(16, 16)}, str(folder / TRIGGERS))
    with pytest.raises(DeepdotError) as caught:
        load_scan(folder)
    message = str(caught.value)
    assert TRIGGERS in message and "\n" not in message
