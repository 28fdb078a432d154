"""``deepdot mitigate`` writes the repaired model in the input's format (ONNX, Keras, TorchScript…).

The inputs are the BadNets digits model exported with deepdot's own exporters. The scan folder is
written directly (``scan.json`` flagging label 7 and its trigger PNGs, the planted trigger standing
in for the recovered one) and the repair uses 300 clean training images, so these tests need no
scan and stay fast; figures are measured on ``digits:test``.
"""

from __future__ import annotations

import copy
import json
import os

import h5py
import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from deepdot.cli import app
from deepdot.errors import ModelError
from deepdot.io.models import load_model
from deepdot.io.save_as import check_save_as, save_model_as
from deepdot.io.scans import load_recovered
from deepdot.mitigate import build_mitigation, measure

os.environ.setdefault("KERAS_BACKEND", "torch")  # Keras 3 on PyTorch, for writing the test inputs

PARITY = 1e-4


@pytest.fixture(scope="module")
def repair_data(tmp_path_factory, digits_train):
    """300 clean training images as an .npz file (``--data``)."""
    path = tmp_path_factory.mktemp("data") / "repair.npz"
    np.savez(path, x=digits_train.x[:300].numpy(), y=digits_train.y[:300].numpy(), num_classes=10)
    return path


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory, badnets_digits):
    pytest.importorskip("onnx")
    from deepdot.io.export import export_onnx

    return export_onnx(badnets_digits[0], tmp_path_factory.mktemp("onnx") / "badnets.onnx")


@pytest.fixture(scope="module")
def keras_model(tmp_path_factory, badnets_digits):
    """The BadNets model as a Neural Cleanse-style Keras file: softmax output, raw 0-255 input
    (the first convolution's weights scaled by 1/255, so it needs ``--preprocess raw``)."""
    pytest.importorskip("keras")
    from deepdot.io.export import export_keras_h5

    raw = copy.deepcopy(badnets_digits[0])
    with torch.no_grad():
        raw.network.conv1.weight.div_(255.0)
    raw.preprocess = "raw"
    return export_keras_h5(raw, tmp_path_factory.mktemp("keras") / "badnets.h5")


@pytest.fixture(scope="module")
def images(digits_test):
    return digits_test.x[:200]


def _mitigate(source, planted_scan_dir, data, out, *args):
    """``deepdot mitigate`` as a user runs it; returns the result and mitigation.json."""
    data_args = ["--data", str(data), "--test-data", "digits:test"]
    result = CliRunner().invoke(
        app, ["mitigate", str(source), "--scan", str(planted_scan_dir), *data_args, "--out", str(out), *map(str, args)]
    )
    summary = json.loads((out / "mitigation.json").read_text())
    # 0: repaired within the budget, 3: not (these tests are about formats, not the repair's quality)
    assert result.exit_code == (0 if summary["within_budget"] else 3), result.output
    return result, summary


def _repaired_in_memory(source, planted_scan_dir, data, method, *, preprocess=None, **settings):
    """What the CLI computes for ``--method method``, repeated through the API (same seed, data)."""
    from deepdot.io import load_data

    classifier = load_model(source, preprocess=preprocess)
    _, backdoors = load_recovered(planted_scan_dir, classifier.input_shape, None)
    algo = build_mitigation(
        method,
        layer=settings.get("layer"),
        false_positive_rate=0.05,
        epochs=settings.get("epochs"),
        max_accuracy_drop=settings.get("max_accuracy_drop", 0.01),
        seed=0,
    )
    return algo.apply(classifier, backdoors, load_data(str(data))).classifier, backdoors


def _logits(model, x):
    with torch.no_grad():
        return model(x)


def test_mitigate_onnx_writes_onnx(onnx_model, planted_scan_dir, repair_data, tmp_path, images, digits_test):
    import onnx

    out = tmp_path / "fixed"
    args = ("--method", "prune", "--layer", "penultimate", "--max-accuracy-drop", "0.5")  # a budget that lets it prune
    result, summary = _mitigate(onnx_model, planted_scan_dir, repair_data, out, *args)
    assert summary["method"] == "prune" and summary["details"]["pruning"]["pruned"] > 0
    assert sorted(p.name for p in out.iterdir()) == ["mitigation.json", "model.json", "model.onnx"]
    assert "model.onnx" in result.output
    graph, source_graph = onnx.load(str(out / "model.onnx")).graph, onnx.load(str(onnx_model)).graph
    assert [n.name for n in graph.node] == [n.name for n in source_graph.node]  # the input graph, new weights
    assert [i.name for i in graph.initializer] == [i.name for i in source_graph.initializer]
    onnx.checker.check_model(onnx.load(str(out / "model.onnx")))

    written = load_model(out / "model.onnx")  # no flags: preprocessing and shape come with the file
    assert written.preprocess == "unit" and written.input_shape == (1, 16, 16) and written.output_kind == "logits"
    assert written.layer_names() == load_model(onnx_model).layer_names()  # --layer names, filter.json stay valid
    repaired, backdoors = _repaired_in_memory(
        onnx_model, planted_scan_dir, repair_data, "prune", layer="penultimate", max_accuracy_drop=0.5
    )
    assert (_logits(written, images) - _logits(repaired, images)).abs().max() < PARITY
    assert (_logits(written, images) - _logits(load_model(onnx_model), images)).abs().max() > 0.1  # it changed
    # The file carries the repair: it measures exactly as the CLI measured the in-memory model.
    after = measure(written, digits_test, backdoors)
    assert after.clean_accuracy == pytest.approx(summary["after"]["clean_accuracy"], abs=1e-9)
    assert after.attack_success_rate == pytest.approx(summary["after"]["attack_success_rate"], abs=1e-9)
    assert after.attack_success_rate < summary["before"]["attack_success_rate"]


def test_filter_of_an_onnx_model_screens_with_it(onnx_model, planted_scan_dir, repair_data, tmp_path):
    out = tmp_path / "filter"
    _mitigate(onnx_model, planted_scan_dir, repair_data, out, "--method", "filter")
    assert json.loads((out / "filter.json").read_text())["model"] == "model.onnx"
    res = CliRunner().invoke(app, ["filter", str(out), "--data", "digits:test", "--out", str(tmp_path / "screened")])
    assert res.exit_code in (0, 1), res.output
    assert json.loads((tmp_path / "screened" / "filtered.json").read_text())["model"].endswith("model.onnx")


def test_mitigate_keras_writes_keras(keras_model, planted_scan_dir, repair_data, tmp_path, images, digits_test):
    out = tmp_path / "fixed"
    args = ("--method", "unlearn", "--epochs", "1", "--preprocess", "raw")
    _, summary = _mitigate(keras_model, planted_scan_dir, repair_data, out, *args)
    assert sorted(p.name for p in out.iterdir()) == ["mitigation.json", "model.h5", "model.json"]
    with h5py.File(out / "model.h5", "r") as f, h5py.File(keras_model, "r") as g:  # the input's layers, new weights
        assert f.attrs["model_config"] == g.attrs["model_config"]
        assert "softmax" in str(f.attrs["model_config"])

    written = load_model(out / "model.h5")  # --preprocess raw is remembered beside the file
    assert written.preprocess == "raw" and written.output_kind == "probabilities" and written.softmax_removed
    repaired, backdoors = _repaired_in_memory(
        keras_model, planted_scan_dir, repair_data, "unlearn", preprocess="raw", epochs=1
    )
    assert (_logits(written, images) - _logits(repaired, images)).abs().max() < PARITY
    after = measure(written, digits_test, backdoors)
    assert after.clean_accuracy == pytest.approx(summary["after"]["clean_accuracy"], abs=1e-9)
    assert after.attack_success_rate == pytest.approx(summary["after"]["attack_success_rate"], abs=1e-9)
    assert after.attack_success_rate < summary["before"]["attack_success_rate"]

    keras = pytest.importorskip("keras")  # and Keras itself reads the repaired file the same way
    probabilities = keras.saving.load_model(str(out / "model.h5"), compile=False)(
        images.permute(0, 2, 3, 1).numpy() * 255.0
    )
    probabilities = np.asarray(probabilities.detach() if hasattr(probabilities, "detach") else probabilities)
    assert np.abs(probabilities - _logits(written, images).softmax(1).numpy()).max() < PARITY

    res = CliRunner().invoke(app, ["evaluate", str(out / "model.h5"), "--data", "digits"])
    assert res.exit_code == 0, res.output


def test_unwritable_model_fails_before_mitigating(tmp_path, planted_scan_dir):
    """A Keras batch norm without ``scale`` has no place for a repaired gamma: refused up front."""
    keras = pytest.importorskip("keras")
    from keras import layers

    model = keras.Sequential(
        [
            keras.Input((16, 16, 1)),
            layers.Conv2D(4, 3),
            layers.BatchNormalization(scale=False),
            layers.ReLU(),
            layers.Flatten(),
            layers.Dense(10),
        ]
    )
    path = tmp_path / "noscale.h5"
    model.save(path)
    out = tmp_path / "fixed"
    result = CliRunner().invoke(
        app, ["mitigate", str(path), "--scan", str(planted_scan_dir), "--method", "unlearn", "--out", str(out)]
    )
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(path) in errors[0] and "cannot be written as Keras" in errors[0]
    assert "mitigating" not in result.output and not (out / "mitigation.json").exists()


# -- save_model_as without the CLI -------------------------------------------------------------
def _perturbed(classifier):
    """A 'repaired' copy: weights changed in place, as the mitigations change them."""
    with torch.no_grad():
        for i, p in enumerate(classifier.network.parameters()):
            p.mul_(0.5 + 0.1 * i)
    return classifier


@pytest.mark.parametrize("kind", ["torchscript", "state_dict", "pickle"])
def test_torch_files_are_written_back(kind, badnets_digits, tmp_path, images):
    net = badnets_digits[0].network
    source = tmp_path / "model.pt"
    if kind == "torchscript":
        torch.jit.script(net).save(str(source), _extra_files={"model.json": json.dumps({"input_shape": [1, 16, 16]})})
        loaded = load_model(source, preprocess="inception")
    elif kind == "state_dict":
        torch.save(net.state_dict(), source)
        loaded = load_model(source, arch="digits_net", preprocess="inception")
    else:
        torch.save(net, source)
        loaded = load_model(source, allow_pickle=True, input_shape=(1, 16, 16), preprocess="inception")
    fmt = check_save_as(loaded, source)
    assert fmt.kind == ("state_dict" if kind == "state_dict" else "torchscript")
    assert bool(fmt.note) == (kind == "pickle")
    repaired = _perturbed(loaded if kind == "torchscript" else copy.deepcopy(loaded))
    paths = save_model_as(repaired, source, tmp_path / "out", fmt=fmt)
    assert [p.name for p in paths] == ["model.pt", "model.json"]
    written = load_model(paths[0])  # no --arch, --preprocess or --allow-pickle needed
    assert written.preprocess == "inception" and written.architecture == loaded.architecture
    assert (_logits(written, images) - _logits(repaired, images)).abs().max() < PARITY


def test_keras_native_archive_stays_keras(badnets_digits, tmp_path, images):
    keras = pytest.importorskip("keras")
    from deepdot.io.export import export_keras_h5

    h5 = export_keras_h5(badnets_digits[0], tmp_path / "model.h5")
    source = tmp_path / "model.keras"
    keras.saving.load_model(str(h5), compile=False).save(source)
    repaired = _perturbed(load_model(source))
    paths = save_model_as(repaired, source, tmp_path / "out", fmt=check_save_as(repaired, source))
    assert paths[0].name == "model.keras"
    assert (_logits(load_model(paths[0]), images) - _logits(repaired, images)).abs().max() < PARITY
    assert (_logits(load_model(tmp_path / "out"), images) - _logits(repaired, images)).abs().max() < PARITY


def test_onnx_softmax_and_channels_last_input_are_kept(badnets_digits, tmp_path, images):
    onnx = pytest.importorskip("onnx")

    class SoftmaxChannelsLast(nn.Module):
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.softmax(self.net(x.permute(0, 3, 1, 2)), 1)

    source = tmp_path / "nhwc.onnx"
    wrapped = SoftmaxChannelsLast(badnets_digits[0].network)
    example = (images[:1].permute(0, 2, 3, 1),)
    torch.onnx.export(wrapped, example, str(source), dynamo=False, dynamic_axes={"x": {0: "n"}}, input_names=["x"])
    repaired = _perturbed(load_model(source))
    paths = save_model_as(repaired, source, tmp_path / "out", fmt=check_save_as(repaired, source))
    graph = onnx.load(str(paths[0])).graph
    assert [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim][1:] == [16, 16, 1]
    assert graph.node[-1].op_type == "Softmax"
    written = load_model(paths[0])
    assert written.output_kind == "probabilities" and written.softmax_removed
    assert (_logits(written, images) - _logits(repaired, images)).abs().max() < PARITY


def test_onnx_gemm_matmul_and_batch_norm_weights_go_back_in_place(tmp_path):
    """Gemm with transB=0, alpha, beta and a (1, N) bias, MatMul, and a batch norm kept as a node."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    torch.manual_seed(0)
    x = torch.rand(8, 1, 4, 4)
    body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten()).eval()
    conv_path = tmp_path / "body.onnx"
    torch.onnx.export(body, (x[:1],), str(conv_path), dynamo=False, input_names=["x"], do_constant_folding=False)
    model = onnx.load(str(conv_path))
    assert "BatchNormalization" in [n.op_type for n in model.graph.node]
    rng = np.random.default_rng(0)
    arrays = {
        "W": rng.standard_normal((64, 6)).astype(np.float32),
        "C": rng.standard_normal((1, 6)).astype(np.float32),
        "M": rng.standard_normal((6, 3)).astype(np.float32),
    }
    graph = model.graph
    features = graph.output[0].name
    graph.node.extend(
        [
            helper.make_node("Gemm", [features, "W", "C"], ["g"], name="gemm", alpha=2.0, beta=0.5, transB=0),
            helper.make_node("Relu", ["g"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "M"], ["y"], name="matmul"),
        ]
    )
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in arrays.items())
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3]))
    source = tmp_path / "mixed.onnx"
    onnx.save(model, str(source))

    repaired = load_model(source)
    with torch.no_grad():
        for p in repaired.network.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        for b in repaired.network.buffers():
            if b.is_floating_point():
                b.mul_(1.5)
    paths = save_model_as(repaired, source, tmp_path / "out", fmt=check_save_as(repaired, source))
    written = onnx.load(str(paths[0]))
    # The exporter stored the fresh batch norm's variance as an Identity alias of its scale (both
    # ones); repaired, they differ, so the alias became a tensor of its own. Nothing else changed.
    assert [n.name for n in written.graph.node] == [n.name for n in graph.node if n.op_type != "Identity"]
    stored = {i.name: numpy_helper.to_array(i) for i in written.graph.initializer}
    assert {"1.running_var", "1.running_mean"} <= set(stored)
    assert stored["C"].shape == (1, 6) and stored["W"].shape == (64, 6)
    reloaded = load_model(paths[0])
    assert reloaded.layer_names() == repaired.layer_names()
    assert (_logits(reloaded, x) - _logits(repaired, x)).abs().max() < PARITY


def test_built_in_model_falls_back_to_safetensors(badnets_digits, tmp_path, monkeypatch, images):
    import deepdot.io.save_as as save_as

    source = tmp_path / "weights.pt"
    torch.save(badnets_digits[0].network.state_dict(), source)
    loaded = load_model(source, arch="digits_net")

    def refuse(*_args: object) -> None:
        raise ModelError("no room for it")

    monkeypatch.setattr(save_as, "_trial", refuse)
    fmt = check_save_as(loaded, source)
    assert fmt.kind == "deepdot" and "no room for it" in fmt.note and "model.safetensors" in fmt.note
    paths = save_model_as(loaded, source, tmp_path / "out", fmt=fmt)
    assert [p.name for p in paths] == ["model.safetensors", "model.json"]
    assert (_logits(load_model(tmp_path / "out"), images) - _logits(loaded, images)).abs().max() < PARITY

    loaded.architecture = None  # not built in: nothing to fall back to
    with pytest.raises(ModelError, match="nothing was changed"):
        check_save_as(loaded, source)


def test_a_left_over_hook_is_refused(badnets_digits, tmp_path):
    model = copy.deepcopy(badnets_digits[0])
    model.network.fc1.register_forward_hook(lambda _m, _i, out: out * 0)
    with pytest.raises(ModelError, match="forward hook"):
        save_model_as(model, tmp_path / "in", tmp_path / "out")
