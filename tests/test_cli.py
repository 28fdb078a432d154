"""The command line, run as a user would (through typer's runner): outputs, JSON keys, exit codes."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from deepdot.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_models_lists_builtins():
    result = run("models")
    assert result.exit_code == 0
    for name in ("digits_net", "nc_mnist", "nc_gtsrb", "resnet20"):
        assert name in result.output


def test_train_attack_evaluate_round_trip(tmp_path):
    out = tmp_path / "bad"
    r = run("attack", "--data", "digits", "--target", "3", "--epochs", "12", "--out", out)
    assert r.exit_code == 0, r.output
    figures = json.loads((out / "attack.json").read_text())
    assert figures["target"] == 3 and figures["attack_success_rate"] > 0.8 and figures["clean_accuracy"] > 0.85
    assert (out / "model.safetensors").exists() and (out / "model.json").exists() and (out / "trigger.npz").exists()
    ev = run(
        "evaluate",
        out / "model.safetensors",
        "--data",
        "digits",
        "--trigger",
        out / "trigger.npz",
        "--target",
        3,
        "--out",
        tmp_path / "ev",
    )
    assert ev.exit_code == 0, ev.output
    evaluated = json.loads((tmp_path / "ev" / "evaluate.json").read_text())
    assert evaluated["attack_success_rate"] == pytest.approx(figures["attack_success_rate"])
    assert evaluated["clean_accuracy"] == pytest.approx(figures["clean_accuracy"])
    clean = run("train", "--data", "digits", "--epochs", "2", "--out", tmp_path / "clean")
    assert clean.exit_code == 0, clean.output
    assert json.loads((tmp_path / "clean" / "train.json").read_text())["clean_accuracy"] > 0.5


def test_scan_exit_codes_and_outputs(saved_models, tmp_path):
    bad = run("scan", saved_models["badnets"], "--data", "digits", "--out", tmp_path / "bad")
    assert bad.exit_code == 1, bad.output
    report = json.loads((tmp_path / "bad" / "scan.json").read_text())
    assert report["flagged"] == [7] and report["infected"] is True and report["anomaly_index"] > 2
    for key in ("labels", "median", "mad", "seconds", "image_passes"):
        assert key in report
    from deepdot.io.models import model_digest

    assert report["model_sha256"] == model_digest(saved_models["badnets"])
    assert {"label", "mask_l1", "attack_success_rate"} <= set(report["labels"][0])
    for kind in ("mask", "pattern", "fusion"):
        assert (tmp_path / "bad" / f"label_7_{kind}.png").exists()
    assert "BACKDOOR FOUND" in bad.output and "anomaly index" in bad.output
    clean = run("scan", saved_models["clean"], "--data", "digits", "--out", tmp_path / "clean")
    assert clean.exit_code == 0, clean.output
    assert json.loads((tmp_path / "clean" / "scan.json").read_text())["flagged"] == []


def test_interrupted_scan_resumes_to_the_same_result(saved_models, tmp_path, monkeypatch):
    from deepdot.scan import NeuralCleanse

    args = [
        "scan",
        saved_models["badnets"],
        "--mode",
        "faithful",
        "--steps",
        "4",
        "--samples-per-step",
        "32",
        "--labels",
        "0,3,5,7",
        "--data",
        "digits",
    ]
    reference = run(*args, "--out", tmp_path / "ref")
    assert reference.exit_code in (0, 1)
    expected = json.loads((tmp_path / "ref" / "scan.json").read_text())

    original = NeuralCleanse.reverse_engineer
    calls = {"n": 0}

    def flaky(self, classifier, x, label, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, classifier, x, label, **kw)

    monkeypatch.setattr(NeuralCleanse, "reverse_engineer", flaky)
    stopped = runner.invoke(app, [str(a) for a in args] + ["--out", str(tmp_path / "run")])
    assert stopped.exit_code == 130
    assert not (tmp_path / "run" / "scan.json").exists()
    monkeypatch.setattr(NeuralCleanse, "reverse_engineer", original)
    resumed = run(*args, "--out", tmp_path / "run")
    assert "resuming: 2 label(s)" in resumed.output
    got = json.loads((tmp_path / "run" / "scan.json").read_text())
    assert [r["mask_l1"] for r in got["labels"]] == [r["mask_l1"] for r in expected["labels"]]
    assert got["anomaly_index"] == expected["anomaly_index"] and resumed.exit_code == reference.exit_code


@pytest.mark.parametrize(
    "case, needle",
    [
        ("missing_model", "no such model file"),
        ("bad_data", "not a readable .npz"),
        ("wrong_shape", "but the model takes"),
        ("wrong_preprocess", "--preprocess"),
        ("unwritable_out", "cannot write"),
        ("bad_labels", "outside the model's"),
    ],
)
def test_bad_input_exits_2_with_one_line(saved_models, tmp_path, case, needle):
    model, data, extra, out = saved_models["badnets"], "digits", [], tmp_path / "o"
    if case == "missing_model":
        model = tmp_path / "nope.safetensors"
    elif case == "bad_data":
        data = tmp_path / "broken.npz"
        data.write_bytes(b"garbage")
    elif case == "wrong_shape":
        data = tmp_path / "big.npz"
        np.savez(data, x=np.zeros((4, 28, 28), np.uint8), y=np.arange(4))
    elif case == "wrong_preprocess":
        extra = ["--preprocess", "mean=1 std=1"]
    elif case == "unwritable_out":
        blocker = tmp_path / "file"
        blocker.write_text("")
        out = blocker / "sub"
    elif case == "bad_labels":
        extra = ["--labels", "1,2,42"]
    result = runner.invoke(app, ["scan", str(model), "--data", str(data), "--out", str(out), "--steps", "2", *extra])
    assert result.exit_code == 2
    assert needle in result.output
    assert "Traceback" not in result.output
    assert len([line for line in result.output.strip().splitlines() if line.startswith("error:")]) == 1


def test_usage_error_exits_2():
    assert runner.invoke(app, ["scan"]).exit_code == 2
    assert runner.invoke(app, ["scan", "x", "--mode", "quick"]).exit_code == 2


def test_progress_without_a_terminal_prints_throttled_lines():
    """When output is not a terminal (a log file), no bars are drawn but a plain line per stage
    shows the run is moving: the first event of a stage, then at most one per interval, and the
    end of every stage but the inner step loop."""
    import io

    from rich.console import Console

    from deepdot.progress import ProgressEvent
    from deepdot.report.console import ProgressBars

    out = io.StringIO()
    with ProgressBars(Console(file=out, force_terminal=False, width=120), enabled=False, interval=3600) as bars:
        bars(ProgressEvent("label", 1, 3, {"label": 5}))
        bars(ProgressEvent("label", 2, 3, {"label": 6}))  # within the interval: not printed
        bars(ProgressEvent("step", 1, 10))
        bars(ProgressEvent("step", 10, 10))  # the step loop's end is not worth a line
        bars(ProgressEvent("label", 3, 3, {"label": 7}))  # a stage's end always is
    lines = out.getvalue().splitlines()
    assert lines == ["labels 1/3 label 5", "steps 1/10", "labels 3/3 label 7"]
