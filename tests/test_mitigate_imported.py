"""Pruning models deepdot converted from other formats, and mitigating TorchScript models.

ONNX models load as a :class:`~deepdot.io.convert.GraphNetwork` (the last conv's ReLU is a
module of its own), Keras models nest each layer's activation inside it and flatten channels
last; pruning must bake into their weights all the same. The inputs are the BadNets digits model
exported to ONNX and to a Neural Cleanse-style Keras file; the scan folder is written directly
(the planted trigger standing in for the recovered one), so no scan runs here.
"""

from __future__ import annotations

import copy
import json
import os
from collections import OrderedDict

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from conftest import DIGITS_TARGET
from deepdot.cli import app
from deepdot.data import ImageData
from deepdot.io.convert import Add, ChannelsLastFlatten, GraphNetwork, Step
from deepdot.io.files import load_trigger, save_trigger, write_json
from deepdot.io.models import load_model
from deepdot.mitigate import MitigationError, NeuronPruning, PlantedBackdoor, RecoveredBackdoor, measure
from deepdot.mitigate.layers import bake_pruning, units_off
from deepdot.models import Classifier

os.environ.setdefault("KERAS_BACKEND", "torch")  # Keras 3 on PyTorch, for writing the test inputs

PARITY = 1e-4


@pytest.fixture(scope="module")
def trigger_file(tmp_path_factory, digits_trigger):
    return save_trigger(digits_trigger, tmp_path_factory.mktemp("trigger") / "trigger.npz")


@pytest.fixture(scope="module")
def imported(tmp_path_factory, badnets_digits):
    """{format: (model file, extra CLI options)}: ONNX, and a Keras file taking raw 0-255 pixels
    (the first convolution's weights scaled by 1/255) that ends in a softmax."""
    pytest.importorskip("onnx")
    pytest.importorskip("keras")
    from deepdot.io.export import export_keras_h5, export_onnx

    root = tmp_path_factory.mktemp("imported")
    raw = copy.deepcopy(badnets_digits[0])
    with torch.no_grad():
        raw.network.conv1.weight.div_(255.0)
    raw.preprocess = "raw"
    return {
        "onnx": (export_onnx(badnets_digits[0], root / "badnets.onnx"), ()),
        "keras": (export_keras_h5(raw, root / "badnets.h5"), ("--preprocess", "raw")),
    }


def _mitigate(monkeypatch, source, planted_scan_dir, out, *args):
    """``deepdot mitigate`` as a user runs it; returns the CLI result, mitigation.json and the
    repaired model the CLI held in memory when it wrote the file."""
    import deepdot.io.save_as as save_as

    kept: list[Classifier] = []
    write = save_as.save_model_as

    def keep(classifier, *a, **kw):
        kept.append(classifier)
        return write(classifier, *a, **kw)

    monkeypatch.setattr(save_as, "save_model_as", keep)
    result = CliRunner().invoke(
        app, ["mitigate", str(source), "--scan", str(planted_scan_dir), "--out", str(out), *map(str, args)]
    )
    summary = json.loads((out / "mitigation.json").read_text()) if (out / "mitigation.json").exists() else None
    return result, summary, (kept[-1] if kept else None)  # the last write; the first is the format trial


def _logits(model, x):
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("fmt", ["onnx", "keras"])
@pytest.mark.parametrize(
    ("method", "options"),
    [
        # Pruning alone barely moves the planted trigger of this model (1.0 -> 0.99 at half the
        # channels), so one epoch of fine-tuning with the pruned units held off follows.
        # A wide accuracy budget lets both prune (these tests are about formats, not repair quality).
        ("prune", ("--epochs", "1", "--lr", "0.005", "--max-accuracy-drop", "0.5")),
        ("fine-prune", ("--epochs", "2", "--max-accuracy-drop", "0.5")),
    ],
)
def test_pruning_an_imported_model(
    fmt, method, options, imported, planted_scan_dir, trigger_file, digits_test, tmp_path, monkeypatch
):
    source, extra = imported[fmt]
    out = tmp_path / "fixed"
    planted_args = ("--trigger", trigger_file, "--target", DIGITS_TARGET)
    data_args = ("--data", "digits:train", "--test-data", "digits:test")
    result, summary, repaired = _mitigate(
        monkeypatch, source, planted_scan_dir, out, "--method", method, *options, *data_args, *planted_args, *extra
    )
    assert result.exit_code == (0 if summary["within_budget"] else 3), result.output  # 3: not within budget

    original = load_model(source, preprocess="raw" if fmt == "keras" else None)
    pruning = summary["details"]["pruning"]
    layer, pruned = pruning["layer"], pruning["pruned_units"]
    assert summary["method"] == method and layer == original.last_conv_layer and pruning["units"] == 32
    assert pruned

    written = load_model(out / f"model{source.suffix}")  # preprocessing remembered beside the file
    x = digits_test.x[:300]
    assert (_logits(written, x) - _logits(repaired, x)).abs().max() < PARITY

    # The pruning is in the file: the pruned units are off (they were not before) and switching
    # them off again changes nothing.
    assert float(original.activations(x, layer)[:, pruned].abs().max()) > 0.1
    assert float(written.activations(x, layer)[:, pruned].abs().max()) == 0.0
    with units_off(written, layer, pruned):
        assert (_logits(written, x) - _logits(repaired, x)).abs().max() < PARITY

    planted = PlantedBackdoor(DIGITS_TARGET, load_trigger(trigger_file))
    backdoors = [RecoveredBackdoor(DIGITS_TARGET, planted.trigger)]
    after = measure(written, digits_test, backdoors, planted)
    assert after.planted_attack_success_rate == pytest.approx(summary["after"]["planted_attack_success_rate"], abs=1e-9)
    assert after.planted_attack_success_rate < 0.5 * summary["before"]["planted_attack_success_rate"]


# -- baking into the weights, whatever holds the layer ------------------------------------------
def _graph(layers: dict[str, nn.Module], steps: list[tuple[str, tuple[str, ...]]]) -> Classifier:
    """A classifier of 1x8x8 images around a GraphNetwork whose step ``name`` outputs tensor ``name``."""
    network = GraphNetwork("x", [Step(name, inputs, name) for name, inputs in steps], steps[-1][0], layers)
    torch.manual_seed(0)
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
                module.bias.uniform_(-1, 1)
    return Classifier(network, input_shape=(1, 8, 8), num_classes=3)


def _baked_equals_hooked(model: Classifier, layer: str, units: list[int]) -> str:
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with units_off(model, layer, units):
        expected = _logits(model, x)
    changed = bake_pruning(model, layer, units, x)
    assert (_logits(model, x) - expected).abs().max() < 1e-5
    return changed


@pytest.mark.parametrize("layer", ["bn", "relu", "pool"])
def test_bakes_into_the_producer_through_batch_norm_in_a_graph(layer):
    model = _graph(
        {
            "conv": nn.Conv2d(1, 4, 3, padding=1, bias=False),
            "bn": nn.BatchNorm2d(4),
            "relu": nn.ReLU(),
            "pool": nn.MaxPool2d(2),
            "flat": nn.Flatten(),
            "fc": nn.Linear(64, 3),
        },
        [
            ("conv", ("x",)),
            ("bn", ("conv",)),
            ("relu", ("bn",)),
            ("pool", ("relu",)),
            ("flat", ("pool",)),
            ("fc", ("flat",)),
        ],
    )
    assert _baked_equals_hooked(model, layer, [1, 3]) == "conv"
    x = torch.rand(4, 1, 8, 8)
    assert float(model.activations(x, layer)[:, [1, 3]].abs().max()) == 0.0  # exactly off, for any input
    assert float(model.activations(x, layer)[:, [0, 2]].abs().max()) > 0


def test_bakes_into_a_conv_nested_with_its_activation():
    """Keras layers become Sequential(conv, activation); the layer named is the whole of it."""
    net = nn.Sequential(
        OrderedDict(
            conv2d=nn.Sequential(OrderedDict(conv=nn.Conv2d(1, 4, 3, padding=1), activation=nn.ReLU())),
            flatten=ChannelsLastFlatten(),
            dense=nn.Linear(4 * 8 * 8, 3),
        )
    )
    model = Classifier(net, input_shape=(1, 8, 8), num_classes=3)
    assert _baked_equals_hooked(model, "conv2d", [0, 2]) == "conv2d.conv"


def test_without_a_single_producer_the_channels_last_reader_is_zeroed():
    """Two branches add up, then a Keras (channels-last) flatten feeds the dense layer."""
    model = _graph(
        {
            "a": nn.Conv2d(1, 4, 3, padding=1),
            "b": nn.Conv2d(1, 4, 3, padding=1),
            "sum": Add(),
            "relu": nn.ReLU(),
            "flat": ChannelsLastFlatten(),
            "fc": nn.Linear(4 * 8 * 8, 3),
        },
        [("a", ("x",)), ("b", ("x",)), ("sum", ("a", "b")), ("relu", ("sum",)), ("flat", ("relu",)), ("fc", ("flat",))],
    )
    assert _baked_equals_hooked(model, "relu", [1, 2]) == "fc"
    weight = model.network.fc.weight.detach().view(3, 8, 8, 4)  # H, W, C order
    assert (weight[..., [1, 2]] == 0).all() and (weight[..., [0, 3]] != 0).all()


def test_a_layer_that_cannot_be_baked_is_refused_before_the_search(
    digits_trigger, tmp_path, planted_scan_dir, monkeypatch
):
    """Units behind a sigmoid that feeds another sigmoid: zero neither where they are made nor
    where they are read. Refused by the check that runs before any pruning, the model untouched."""
    onnx = pytest.importorskip("onnx")
    net = nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(1, 4, 3, padding=1),
            gate=nn.Sigmoid(),
            squash=nn.Sigmoid(),
            flatten=nn.Flatten(),
            fc=nn.Linear(4 * 16 * 16, 10),
        )
    )
    model = Classifier(net, input_shape=(1, 16, 16), num_classes=10)
    x = torch.rand(8, 1, 16, 16)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MitigationError, match="cannot prune units of layer 'gate'"):
        bake_pruning(model, "gate", [0, 1], x)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())

    import deepdot.mitigate.prune as prune

    def no_search(*_args: object) -> None:
        raise AssertionError("the pruning search started")

    monkeypatch.setattr(prune, "rank_by_trigger", no_search)
    data = ImageData(x, torch.arange(8) % 10, 10, "random")
    with pytest.raises(MitigationError, match="cannot prune units of layer 'gate'"):
        NeuronPruning(layer="gate").apply(model, RecoveredBackdoor(DIGITS_TARGET, digits_trigger), data)

    source = tmp_path / "gated.onnx"
    torch.onnx.export(net, (x[:1],), str(source), dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "n"}})
    onnx.checker.check_model(onnx.load(str(source)))
    gate = next(name for name in load_model(source).layer_names() if name.startswith("gate"))
    out = tmp_path / "fixed"
    result, summary, _ = _mitigate(
        monkeypatch, source, planted_scan_dir, out, "--method", "prune", "--layer", gate, "--data", "digits:test"
    )
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(source) in errors[0] and f"layer {gate!r}" in errors[0]
    assert "mitigating" not in result.output and summary is None


# -- TorchScript --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def torchscript_model(tmp_path_factory, badnets_digits, digits_train):
    """The BadNets model as TorchScript, and 300 clean training images as an .npz file."""
    import numpy as np

    root = tmp_path_factory.mktemp("torchscript")
    source = root / "badnets.pt"
    meta = json.dumps({"input_shape": [1, 16, 16]})
    torch.jit.script(badnets_digits[0].network).save(str(source), _extra_files={"model.json": meta})
    data = root / "repair.npz"
    np.savez(data, x=digits_train.x[:300].numpy(), y=digits_train.y[:300].numpy(), num_classes=10)
    return source, data


def test_torchscript_unlearns_and_refuses_pruning_in_one_line(
    torchscript_model, planted_scan_dir, tmp_path, monkeypatch
):
    source, data = torchscript_model
    common = ("--data", data, "--test-data", "digits:test", "--epochs", "1")
    result, summary, repaired = _mitigate(
        monkeypatch, source, planted_scan_dir, tmp_path / "unlearned", "--method", "unlearn", *common
    )
    assert result.exit_code == (0 if summary["within_budget"] else 3), result.output  # 3: not within budget
    assert summary["after"]["attack_success_rate"] < summary["before"]["attack_success_rate"]
    written = load_model(tmp_path / "unlearned" / "model.pt")
    x = torch.rand(16, 1, 16, 16)
    assert (_logits(written, x) - _logits(repaired, x)).abs().max() < PARITY
    assert (_logits(written, x) - _logits(load_model(source), x)).abs().max() > 0.1  # it was trained

    for method in ("prune", "fine-prune", "filter"):
        out = tmp_path / method
        result, summary, _ = _mitigate(monkeypatch, source, planted_scan_dir, out, "--method", method, *common)
        assert result.exit_code == 2, result.output
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and str(source) in errors[0] and "TorchScript" in errors[0], result.output
        assert "unlearning or fine-tuning" in errors[0] and "(options: --method)" in errors[0]
        assert "mitigating" not in result.output and summary is None

    # Nor can a saved filter screen inputs with it.
    flt = {
        "layer": "fc1_relu",
        "neurons": [0],
        "threshold": 0.0,
        "target_false_positive_rate": 0.05,
        "calibration_false_positive_rate": 0.05,
    }
    write_json(tmp_path / "filter.json", flt)
    result = CliRunner().invoke(
        app, ["filter", str(tmp_path), "--model", str(source), "--data", "digits:test", "--out", str(tmp_path / "s")]
    )
    assert result.exit_code == 2, result.output
    assert [line for line in result.output.splitlines() if line.startswith("error:")][0].count("TorchScript") == 1

    # auto leaves out what cannot run on the model, saying so, instead of failing half-way.
    result, summary, _ = _mitigate(
        monkeypatch, source, planted_scan_dir, tmp_path / "auto", "--method", "auto", *common
    )
    assert result.exit_code == (0 if summary["within_budget"] else 3), result.output  # 3: not within budget
    assert set(summary["candidates"]) == {"unlearn", "fine-tune"}
    assert "skipping prune" in result.output and "skipping fine-prune" in result.output
