"""Model formats people receive: Keras HDF5/.keras, ONNX, TorchScript, state_dicts, pickles.

Fixtures are written by the real producers (Keras 3 on the PyTorch backend, ``torch.onnx.export``,
``torch.jit``, ``torch.save``) and every converted model is checked against the original on the
built-in digits images. Bad input must give a one-line ``ModelError`` naming the file.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from deepdot.errors import ModelError
from deepdot.io import load_data
from deepdot.io.models import load_model, save_model
from deepdot.models import build_classifier

os.environ["KERAS_BACKEND"] = "torch"  # Keras 3 on PyTorch: a test-only producer of .h5 files

PARITY = 1e-4


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """64 real digits images, 1×16×16 in [0, 1]."""
    return load_data("digits:test").x[:64]


def _randomise_batch_norm(net: nn.Module) -> None:
    """Non-trivial running statistics, so that batch norm conversion is really tested."""
    gen = torch.Generator().manual_seed(0)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=gen))
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen))


def _error(path: Path, **kwargs) -> str:
    """The message of the ModelError that loading ``path`` raises (asserted to be one line)."""
    with pytest.raises(ModelError) as info:
        load_model(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    return message


# -- Keras -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keras():
    torch.set_num_threads(1)
    return pytest.importorskip("keras")


def _keras_bn_stats(model) -> None:
    from keras import layers

    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.5, n).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 1.5, n).astype("float32"))
            layer.gamma.assign(rng.normal(1, 0.3, n).astype("float32"))
            layer.beta.assign(rng.normal(0, 0.3, n).astype("float32"))


def _keras_out(model, x: torch.Tensor) -> np.ndarray:
    """The Keras model's output for N×C×H×W images (Keras takes N×H×W×C)."""
    return np.asarray(model(x.permute(0, 2, 3, 1).numpy(), training=False).detach().cpu())


@pytest.fixture(scope="module")
def keras_sequential(keras, tmp_path_factory):
    """A Sequential NC-style model ending in softmax: (model, .h5 path)."""
    from keras import layers

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((16, 16, 1)),
            layers.Conv2D(8, 3, padding="same", activation="relu"),
            layers.BatchNormalization(),
            layers.MaxPooling2D(),
            layers.Conv2D(8, 3, strides=2, padding="same"),
            layers.Activation("relu"),
            layers.AveragePooling2D(3, strides=1, padding="same"),
            layers.Dropout(0.2),
            layers.Flatten(),
            layers.Dense(16, activation="relu"),
            layers.Dense(10, activation="softmax"),
        ]
    )
    _keras_bn_stats(model)
    path = tmp_path_factory.mktemp("keras") / "sequential.h5"
    model.save(path)
    return model, path


@pytest.fixture(scope="module")
def keras_functional(keras, tmp_path_factory):
    """A Functional model with batch norm, a residual sum and a concatenation, ending in a
    Softmax layer: (model, its logits sub-model, .h5 path, .keras path)."""
    from keras import layers

    keras.utils.set_random_seed(1)
    inp = keras.Input((16, 16, 1))
    a = layers.Conv2D(6, 3, padding="same")(inp)
    a = layers.BatchNormalization()(a)
    a = layers.ReLU()(a)
    b = layers.Conv2D(6, 1)(inp)
    c = layers.Add()([a, b])
    d = layers.Concatenate()([c, a])
    d = layers.MaxPooling2D(3, strides=2, padding="same")(d)
    e = layers.Flatten()(d)
    logits = layers.Dense(10)(e)
    out = layers.Softmax()(logits)
    model = keras.Model(inp, out)
    _keras_bn_stats(model)
    folder = tmp_path_factory.mktemp("keras")
    model.save(folder / "functional.h5")
    model.save(folder / "functional.keras")
    return model, keras.Model(inp, logits), folder / "functional.h5", folder / "functional.keras"


def test_keras_sequential_matches_keras(keras_sequential, images):
    model, path = keras_sequential
    classifier = load_model(path)
    assert classifier.input_shape == (1, 16, 16) and classifier.num_classes == 10
    assert classifier.output_kind == "probabilities" and classifier.softmax_removed
    expected = _keras_out(model, images)
    with torch.no_grad():
        logits = classifier(images)
    probabilities = torch.softmax(logits, 1).numpy()
    assert np.abs(probabilities - expected).max() < PARITY
    log_probabilities = torch.log_softmax(logits, 1).numpy()
    assert np.abs(log_probabilities - np.log(expected)).max() < PARITY
    assert (logits.argmax(1).numpy() == expected.argmax(1)).all()


@pytest.mark.parametrize("which", ["h5", "keras"])
def test_keras_functional_logits_match_keras(keras_functional, images, which):
    _, logits_model, h5_path, keras_path = keras_functional
    classifier = load_model(h5_path if which == "h5" else keras_path)
    assert classifier.output_kind == "probabilities" and classifier.softmax_removed
    with torch.no_grad():
        ours = classifier(images).numpy()
    assert np.abs(ours - _keras_out(logits_model, images)).max() < PARITY


def test_keras_model_is_differentiable_and_hookable(keras_functional, images):
    classifier = load_model(keras_functional[2])
    x = images[:4].clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(classifier(x), torch.tensor([0, 1, 2, 3])).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert classifier.last_conv_layer in classifier.layer_names()
    assert classifier.penultimate_layer in classifier.layer_names()
    assert classifier.activations(images[:4], classifier.penultimate_layer).shape == (4, 16 * 8 * 8 // 4 * 3)


def test_same_average_pooling_follows_tensorflow():
    """TensorFlow (which wrote Neural Cleanse's models) leaves 'same' padding out of the average.

    (Keras 3's PyTorch backend instead replicates edge pixels when the padding is uneven, so this
    case is checked against TensorFlow's rule directly rather than against Keras-on-torch.)
    """
    from deepdot.io.convert import SameAvgPool2d

    x = torch.arange(8.0).view(1, 1, 1, 8)
    out = SameAvgPool2d((1, 3), (1, 2))(x)
    assert torch.allclose(out.flatten(), torch.tensor([1.0, 3.0, 5.0, 6.5]))


def _keras3_sources(value) -> list:
    """[layer, node, tensor] of every Keras 3 tensor reference in a call's arguments."""
    if isinstance(value, dict) and value.get("class_name") == "__keras_tensor__":
        return [value["config"]["keras_history"]]
    if isinstance(value, list):
        return [source for item in value for source in _keras3_sources(item)]
    return []


def _as_keras2(src: Path, dst: Path) -> None:
    """Rewrite a Keras 3 HDF5 file in the Keras 2 (TensorFlow era) layout Neural Cleanse ships:
    ``Model`` class, ``batch_input_shape``, nested-list ``inbound_nodes`` and ``name:0`` weights."""
    with h5py.File(src, "r") as f_in, h5py.File(dst, "w") as f_out:
        config = json.loads(f_in.attrs["model_config"])
        layers = config["config"]["layers"]
        if config["class_name"] == "Sequential":  # Keras 2.2: no InputLayer, the shape on the first layer
            first, *rest = layers
            rest[0]["config"]["batch_input_shape"] = first["config"]["batch_shape"]
            config["config"]["layers"] = layers = rest
        else:
            config["class_name"] = "Model"
        for layer in layers:
            cfg = layer["config"]
            if "batch_shape" in cfg:
                cfg["batch_input_shape"] = cfg.pop("batch_shape")
            nodes = layer.get("inbound_nodes") or []
            if nodes:
                sources = _keras3_sources(nodes[0]["args"])
                layer["inbound_nodes"] = [[[name, node, tensor, {}] for name, node, tensor in sources]]
        f_out.attrs["model_config"] = json.dumps(config).encode()
        f_out.attrs["keras_version"] = b"2.2.4"
        weights = f_out.create_group("model_weights")
        for name, group in f_in["model_weights"].items():
            out = weights.create_group(name)
            names = []
            for full in group.attrs.get("weight_names", []):
                short = str(full).split("/")[-1]
                out[f"{name}/{short}:0"] = np.asarray(group[full])
                names.append(f"{name}/{short}:0".encode())
            out.attrs["weight_names"] = names


def test_keras2_layout_reads_the_same(keras_sequential, keras_functional, images, tmp_path):
    _, logits_model, h5_path, _ = keras_functional
    old = tmp_path / "keras2_functional.h5"
    _as_keras2(h5_path, old)
    with torch.no_grad():
        ours = load_model(old)(images).numpy()
    assert np.abs(ours - _keras_out(logits_model, images)).max() < PARITY

    sequential, sequential_path = keras_sequential
    old = tmp_path / "keras2_sequential.h5"
    _as_keras2(sequential_path, old)
    classifier = load_model(old)
    assert classifier.input_shape == (1, 16, 16)
    with torch.no_grad():
        probabilities = torch.softmax(classifier(images), 1).numpy()
    assert np.abs(probabilities - _keras_out(sequential, images)).max() < PARITY


# -- ONNX --------------------------------------------------------------------------------------
def _export_onnx(net: nn.Module, example: torch.Tensor, path: Path, **kwargs) -> Path:
    pytest.importorskip("onnx")
    torch.onnx.export(net.eval(), example, path, dynamo=False, input_names=["x"], **kwargs)
    return path


@pytest.mark.parametrize("dynamic_batch", [True, False], ids=["dynamic-batch", "batch-1"])
def test_onnx_sequential_matches_pytorch(tmp_path, images, dynamic_batch):
    torch.manual_seed(0)
    original = build_classifier("digits_net")
    kwargs = {"dynamic_axes": {"x": {0: "n"}}} if dynamic_batch else {}
    path = _export_onnx(original.network, images[:1], tmp_path / "digits.onnx", **kwargs)
    classifier = load_model(path)
    assert classifier.input_shape == (1, 16, 16) and classifier.output_kind == "logits"
    with torch.no_grad():
        assert (classifier(images) - original(images)).abs().max() < PARITY
    assert classifier.last_conv_layer in classifier.layer_names()


@pytest.mark.parametrize("fold", [True, False], ids=["bn-folded", "bn-kept"])
def test_onnx_resnet_with_batch_norm_matches_pytorch(tmp_path, images, fold):
    torch.manual_seed(0)
    original = build_classifier("resnet20", input_shape=(3, 32, 32))
    _randomise_batch_norm(original.network)
    x = torch.nn.functional.interpolate(images[:16], size=32).repeat(1, 3, 1, 1)
    path = _export_onnx(
        original.network, x[:1], tmp_path / "resnet.onnx", dynamic_axes={"x": {0: "n"}}, do_constant_folding=fold
    )
    classifier = load_model(path, preprocess=original.preprocess)
    with torch.no_grad():
        assert (classifier(x) - original(x)).abs().max() < PARITY
    x.requires_grad_(True)
    classifier(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_onnx_final_softmax_is_removed_and_metadata_read(tmp_path, images):
    onnx = pytest.importorskip("onnx")
    torch.manual_seed(0)
    body = nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(64, 10)
    )
    path = _export_onnx(
        nn.Sequential(body, nn.Softmax(1)), images[:1], tmp_path / "soft.onnx", dynamic_axes={"x": {0: "n"}}
    )
    model = onnx.load(str(path))
    model.metadata_props.add(key="preprocess", value="raw")
    onnx.save(model, str(path))
    classifier = load_model(path)
    assert classifier.output_kind == "probabilities" and classifier.softmax_removed
    assert classifier.preprocess == "raw"
    assert load_model(path, preprocess="unit").preprocess == "unit"  # the user's choice wins
    with torch.no_grad():
        assert (classifier(images / 255.0) - body(images)).abs().max() < PARITY


# -- TorchScript, state_dict, safetensors ------------------------------------------------------
@pytest.fixture(scope="module")
def digits_model() -> nn.Module:
    torch.manual_seed(0)
    return build_classifier("digits_net")


def test_torchscript_with_embedded_metadata(tmp_path, digits_model, images):
    path = tmp_path / "model.ts"
    meta = {"input_shape": [1, 16, 16], "preprocess": "inception"}
    torch.jit.script(digits_model.network).save(str(path), _extra_files={"model.json": json.dumps(meta)})
    classifier = load_model(path)
    assert classifier.preprocess == "inception" and classifier.input_shape == (1, 16, 16)
    with torch.no_grad():
        assert (classifier(images) - digits_model.network(images * 2 - 1)).abs().max() < PARITY


def test_torchscript_without_metadata_asks_for_the_input_shape(tmp_path, digits_model, images):
    path = tmp_path / "traced.pt"
    torch.jit.trace(digits_model.network, images[:1]).save(str(path))
    assert "input_shape" in _error(path)
    path.with_suffix(".json").write_text(json.dumps({"input_shape": [1, 16, 16]}))
    with torch.no_grad():
        assert (load_model(path)(images) - digits_model(images)).abs().max() < PARITY


def test_torchscript_softmax_output_is_detected(tmp_path, digits_model, images):
    path = tmp_path / "soft.ts"
    torch.jit.script(nn.Sequential(digits_model.network, nn.Softmax(1))).save(str(path))
    classifier = load_model(path, input_shape=(1, 16, 16))
    assert classifier.output_kind == "probabilities" and not classifier.softmax_removed
    with torch.no_grad():
        expected = torch.log_softmax(digits_model(images), 1)
        assert (torch.log_softmax(classifier(images), 1) - expected).abs().max() < PARITY
    assert "probabilities" in classifier.output_note


@pytest.mark.parametrize("wrap", ["plain", "checkpoint"])
def test_state_dict_with_arch(tmp_path, digits_model, images, wrap):
    state = digits_model.network.state_dict()
    if wrap == "checkpoint":  # a training checkpoint saved from DataParallel
        state = {"epoch": 3, "model_state_dict": {f"module.{k}": v for k, v in state.items()}}
    path = tmp_path / "weights.pth"
    torch.save(state, path)
    assert "--arch" in _error(path)
    classifier = load_model(path, arch="digits_net")
    with torch.no_grad():
        assert (classifier(images) - digits_model(images)).abs().max() == 0
    assert "do not match architecture nc_mnist" in _error(path, arch="nc_mnist")


def test_safetensors_without_model_json_takes_arch(tmp_path, digits_model, images):
    weights = save_model(digits_model, tmp_path / "m")
    (tmp_path / "m" / "model.json").unlink()
    assert "--arch" in _error(weights)
    with torch.no_grad():
        assert (load_model(weights, arch="digits_net")(images) - digits_model(images)).abs().max() == 0


# -- pickles -----------------------------------------------------------------------------------
class _Malicious:
    """Unpickling this creates a file: stands for any code an attacker hides in a pickle."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    if writer == "torch.save":
        torch.save({"fc.weight": torch.zeros(2, 2), "payload": _Malicious(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(_Malicious(marker)))
    message = _error(path)
    assert "refused" in message and "--allow-code" in message
    assert not marker.exists()


def test_whole_pickled_module_needs_allow_pickle(tmp_path, digits_model, images):
    path = tmp_path / "whole.pt"
    torch.save(digits_model.network, path)
    assert "--allow-code" in _error(path)
    classifier = load_model(path, allow_pickle=True, input_shape=(1, 16, 16))
    with torch.no_grad():
        assert (classifier(images) - digits_model(images)).abs().max() == 0


# -- bad input ---------------------------------------------------------------------------------
def _truncate(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, keras_sequential, digits_model, images):
    """name -> (path, words the error must contain)."""
    from keras import layers

    keras = pytest.importorskip("keras")
    root = tmp_path_factory.mktemp("bad")
    files: dict[str, tuple[Path, tuple[str, ...]]] = {}
    files["h5-truncated"] = (_truncate(keras_sequential[1], root / "truncated.h5"), ("corrupt, truncated",))
    (root / "garbage.h5").write_bytes(b"not an hdf5 file" * 64)
    files["h5-garbage"] = (root / "garbage.h5", ("corrupt, truncated",))
    with h5py.File(root / "weights_only.h5", "w") as f:
        f.create_dataset("dense/kernel:0", data=np.zeros((2, 2)))
    files["h5-weights-only"] = (root / "weights_only.h5", ("model_config", "model.save()"))

    unknown = keras.Sequential(
        [keras.Input((16, 16, 1)), layers.SeparableConv2D(4, 3), layers.Flatten(), layers.Dense(10)]
    )
    unknown.save(root / "unknown_layer.h5")
    files["h5-unknown-layer"] = (root / "unknown_layer.h5", ("unsupported Keras layer type 'SeparableConv2D'",))

    nan_model = keras.Sequential([keras.Input((16, 16, 1)), layers.Flatten(), layers.Dense(10)])
    kernel = np.zeros((256, 10), "float32")
    kernel[3, 4] = np.nan
    nan_model.layers[-1].kernel.assign(kernel)
    nan_model.save(root / "nan.h5")
    files["h5-nan"] = (root / "nan.h5", ("NaN or Inf",))

    pytest.importorskip("onnx")
    net = build_classifier("digits_net").network
    onnx_path = _export_onnx(net, images[:1], root / "good.onnx")
    files["onnx-truncated"] = (_truncate(onnx_path, root / "truncated.onnx"), ("corrupt, truncated",))

    class Unsupported(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.abs(x).flatten(1)[:, :10]

    abs_path = _export_onnx(Unsupported(), images[:1], root / "abs.onnx")
    files["onnx-unknown-op"] = (abs_path, ("unsupported ONNX operator 'Abs'",))
    inf_net = build_classifier("digits_net").network
    with torch.no_grad():
        inf_net.fc2.bias[0] = float("inf")
    files["onnx-inf"] = (_export_onnx(inf_net, images[:1], root / "inf.onnx"), ("NaN or Inf",))

    torch.save(digits_model.network.state_dict(), root / "good.pth")
    files["pt-truncated"] = (_truncate(root / "good.pth", root / "truncated.pth"), ("corrupt, truncated",))
    (root / "garbage.pt").write_bytes(b"hello world" * 10)
    files["pt-garbage"] = (root / "garbage.pt", ("corrupt, truncated",))
    nan_state = {k: v.clone() for k, v in digits_model.network.state_dict().items()}
    nan_state["conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(nan_state, root / "nan.pth")
    files["pt-nan"] = (root / "nan.pth", ("conv1.weight", "NaN or Inf"))
    torch.jit.script(digits_model.network).save(str(root / "good.ts"))
    files["ts-truncated"] = (_truncate(root / "good.ts", root / "truncated.ts"), ("corrupt",))
    (root / "model.tflite").write_bytes(b"\0" * 16)
    files["unknown-suffix"] = (root / "model.tflite", ("unsupported model format '.tflite'",))
    files["missing"] = (root / "missing.onnx", ("no such model file",))
    return files


BAD = [
    "h5-truncated",
    "h5-garbage",
    "h5-weights-only",
    "h5-unknown-layer",
    "h5-nan",
    "onnx-truncated",
    "onnx-unknown-op",
    "onnx-inf",
    "pt-truncated",
    "pt-garbage",
    "pt-nan",
    "ts-truncated",
    "unknown-suffix",
    "missing",
]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_gives_one_clear_line(bad_files, case):
    path, needles = bad_files[case]
    message = _error(path, arch="digits_net", input_shape=(1, 16, 16))
    for needle in needles:
        assert needle in message, message


def test_cli_reports_a_corrupt_model_in_one_line(bad_files):
    from deepdot.cli import app

    path = bad_files["h5-truncated"][0]
    result = CliRunner().invoke(app, ["evaluate", str(path), "--data", "digits"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.strip().splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(path) in errors[0] and "corrupt, truncated" in errors[0]


# -- end to end: a trained Neural Cleanse-style Keras model ------------------------------------
@pytest.fixture(scope="module")
def trained_keras(keras, tmp_path_factory):
    """A small Keras CNN trained on raw 0-255 input with a softmax output, as Neural Cleanse's are
    (batch norm after the first conv keeps training on raw pixels stable in a few epochs)."""
    from keras import layers

    keras.utils.set_random_seed(0)
    train = load_data("digits:train")
    model = keras.Sequential(
        [
            keras.Input((16, 16, 1)),
            layers.Conv2D(16, 3, padding="same"),
            layers.BatchNormalization(),
            layers.ReLU(),
            layers.MaxPooling2D(),
            layers.Flatten(),
            layers.Dense(32, activation="relu"),
            layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    model.fit(train.x.permute(0, 2, 3, 1).numpy() * 255, train.y.numpy(), epochs=3, batch_size=32, verbose=0)
    path = tmp_path_factory.mktemp("trained") / "nc_style.h5"
    model.save(path)
    return model, path


def test_trained_keras_model_predicts_like_keras(trained_keras):
    model, path = trained_keras
    test = load_data("digits:test")
    expected = _keras_out(model, test.x * 255).argmax(1)
    classifier = load_model(path, preprocess="raw")
    predicted = classifier.predict(test.x).numpy()
    assert (predicted == expected).all()
    assert (predicted == test.y.numpy()).mean() > 0.8
    wrong_scale = load_model(path).predict(test.x).numpy()  # 'unit' input: what --preprocess raw fixes
    assert (wrong_scale == test.y.numpy()).mean() < 0.5


def test_cli_evaluates_a_keras_model(trained_keras):
    from deepdot.cli import app

    result = CliRunner().invoke(app, ["evaluate", str(trained_keras[1]), "--data", "digits", "--preprocess", "raw"])
    assert result.exit_code == 0, result.output
    assert "clean" in result.output.lower()


def test_onnx_channels_last_input_is_fed_channels_first(tmp_path, digits_model, images):
    class ChannelsLast(nn.Module):
        """Takes N×H×W×C, as models converted from TensorFlow do."""

        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x.permute(0, 3, 1, 2))

    wrapped = ChannelsLast(digits_model.network)
    path = _export_onnx(wrapped, images[:1].permute(0, 2, 3, 1), tmp_path / "nhwc.onnx", dynamic_axes={"x": {0: "n"}})
    classifier = load_model(path)
    assert classifier.input_shape == (1, 16, 16)
    with torch.no_grad():
        assert (classifier(images) - digits_model(images)).abs().max() < PARITY


# -- exports (deepdot.io.export) -----------------------------------------------------------------
def test_nc_gtsrb_exports_to_keras_h5_and_onnx_and_loads_back(keras, tmp_path):
    """The exports behind benchmarks/export_formats.py: Keras' own output and deepdot's loaders agree."""
    pytest.importorskip("onnx")
    from deepdot.io.export import export_keras_h5, export_onnx

    torch.manual_seed(0)
    native = build_classifier("nc_gtsrb")  # preprocess "raw", channels-first, flatten in C,H,W order
    x = torch.rand(8, 3, 32, 32)
    with torch.no_grad():
        expected = native(x)
    h5 = export_keras_h5(native, tmp_path / "gtsrb.h5")
    keras_model = keras.saving.load_model(str(h5), compile=False)
    keras_probs = _keras_out(keras_model, x * 255.0)
    assert np.abs(keras_probs - expected.softmax(1).numpy()).max() < PARITY
    from_h5 = load_model(h5, preprocess="raw")
    assert from_h5.output_kind == "probabilities" and from_h5.softmax_removed
    from_onnx = load_model(export_onnx(native, tmp_path / "gtsrb.onnx"))
    assert from_onnx.preprocess == "raw" and from_onnx.input_shape == (3, 32, 32)
    with torch.no_grad():
        assert (from_h5(x) - expected).abs().max() < PARITY
        assert (from_onnx(x) - expected).abs().max() < PARITY
