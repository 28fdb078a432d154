import json

import pytest
import torch

from deepdot.errors import ModelError
from deepdot.io.models import load_model, save_model
from deepdot.models import ARCHITECTURES, Classifier, build_classifier, parse_preprocess
from deepdot.models.classifier import preprocess_tensor


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_every_architecture_builds_and_exposes_its_layers(name):
    arch = ARCHITECTURES[name]
    model = build_classifier(name)
    x = torch.rand(2, *arch.input_shape)
    assert model(x).shape == (2, arch.num_classes)
    assert model.activations(x, arch.penultimate_layer).shape[0] == 2
    assert model.activations(x, arch.last_conv_layer).ndim == 4
    assert not model.training  # wrapper keeps eval mode


def test_nc_gtsrb_matches_the_reference_layout():
    net = build_classifier("nc_gtsrb").network
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    dense = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64, 128, 128]
    assert [(d.in_features, d.out_features) for d in dense] == [(512, 512), (512, 43)]


@pytest.mark.parametrize(
    "spec, pixel, expected",
    [("unit", 0.5, 0.5), ("raw", 0.5, 127.5), ("inception", 0.5, 0.0), ({"mean": [0.5], "std": [0.25]}, 1.0, 2.0)],
)
def test_preprocessing(spec, pixel, expected):
    x = torch.full((1, 1, 2, 2), pixel)
    assert torch.allclose(preprocess_tensor(x, parse_preprocess(spec)), torch.tensor(expected))


def test_imagenet_preprocessing_is_bgr_mean_centred():
    x = torch.zeros(1, 3, 1, 1)
    x[0, 0] = 1.0  # pure red
    out = preprocess_tensor(x, "imagenet").flatten().tolist()
    assert out == pytest.approx([-103.939, -116.779, 255 - 123.68])


def test_bad_preprocess_is_one_line():
    with pytest.raises(ModelError, match="unknown preprocess"):
        parse_preprocess("zscore")
    assert parse_preprocess("mean=0.5,0.5,0.5 std=0.2,0.2,0.2") == {"mean": [0.5] * 3, "std": [0.2] * 3}


def test_save_load_round_trip_gives_identical_logits(tmp_path):
    torch.manual_seed(0)
    model = build_classifier("resnet20")  # has batch-norm buffers
    model.network.train()
    model.network(torch.rand(8, 3, 32, 32))  # move running stats away from their init
    model.eval()
    save_model(model, tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["architecture"] == "resnet20" and meta["num_classes"] == 10 and meta["input_shape"] == [3, 32, 32]
    back = load_model(tmp_path / "m" / "model.safetensors")
    x = torch.rand(4, 3, 32, 32)
    assert torch.allclose(model(x), back(x), atol=1e-6)


def test_load_errors_are_one_line(tmp_path):
    model = build_classifier("digits_net")
    save_model(model, tmp_path / "ok")
    with pytest.raises(ModelError, match="no such model file"):
        load_model(tmp_path / "missing")
    # truncated weights
    (tmp_path / "cut").mkdir()
    data = (tmp_path / "ok" / "model.safetensors").read_bytes()
    (tmp_path / "cut" / "model.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "cut" / "model.json").write_text((tmp_path / "ok" / "model.json").read_text())
    with pytest.raises(ModelError, match="corrupt or truncated"):
        load_model(tmp_path / "cut")
    # no metadata
    (tmp_path / "nometa").mkdir()
    (tmp_path / "nometa" / "model.safetensors").write_bytes(data)
    with pytest.raises(ModelError, match="no model.json"):
        load_model(tmp_path / "nometa")


def test_nan_weights_are_refused(tmp_path):
    model = build_classifier("digits_net")
    with torch.no_grad():
        model.network.fc2.weight[0, 0] = float("nan")
    save_model(model, tmp_path / "nan")
    with pytest.raises(ModelError, match="NaN or Inf"):
        load_model(tmp_path / "nan")


def test_wrapper_without_architecture_cannot_be_saved(tmp_path):
    c = Classifier(torch.nn.Flatten(), input_shape=(1, 2, 2), num_classes=4)
    with pytest.raises(ModelError):
        save_model(c, tmp_path / "x")
