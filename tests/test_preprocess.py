"""Preprocess, the value type of a model's input preprocessing: read once where it enters (the
command line, model.json, sidecars, ONNX metadata), applied to [0, 1] pixels, and written back
exactly as deepdot always stored it (so model.json and checkpoint keys are unchanged)."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from deepdot.errors import ModelError
from deepdot.io import load_data
from deepdot.io.models import load_model, save_model
from deepdot.models import Classifier, Preprocess, build_classifier, parse_preprocess
from deepdot.scan import PreprocessingMismatch

MEAN_STD = {"mean": [0.4914, 0.4822, 0.4465], "std": [0.247, 0.2435, 0.2616]}
EVERY_KIND = [Preprocess(name) for name in ("raw", "unit", "imagenet", "inception")] + [
    Preprocess(mean=(0.5,), std=(0.25,)),
    Preprocess(mean=MEAN_STD["mean"], std=MEAN_STD["std"]),
]


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("unit", Preprocess("unit")),
        ("  raw ", Preprocess("raw")),
        ("mean=0.5,0.4 std=0.2,0.1", Preprocess(mean=(0.5, 0.4), std=(0.2, 0.1))),
        ({"mean": [0, 1], "std": [1, 2]}, Preprocess(mean=(0.0, 1.0), std=(1.0, 2.0))),
    ],
)
def test_parse_reads_names_command_line_text_and_mappings(spec, expected):
    parsed = Preprocess.parse(spec)
    assert parsed == expected and isinstance(parsed, Preprocess)
    assert Preprocess.parse(parsed) is parsed  # a Preprocess passes through
    assert all(isinstance(v, float) for v in parsed.mean + parsed.std)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("zscore", "unknown preprocess 'zscore': use one of raw, unit, imagenet, inception or 'mean=a,b,c std=d,e,f'"),
        ("mean=1,2", "cannot read preprocess 'mean=1,2': expected 'mean=a,b,c std=d,e,f'"),
        ({"mean": [0.5]}, "preprocess dict needs exactly 'mean' and 'std', got ['mean']"),
        ({"mean": [0.5], "std": [0.0]}, "preprocess mean/std must be non-empty, of equal length, std > 0"),
        ({"mean": [0.5, 0.5], "std": [1.0]}, "of equal length"),
        ({"mean": ["a"], "std": [1.0]}, "preprocess mean/std must be"),  # not numbers: one line, no ValueError
        ('{"mean": [0.5], "std": [0.25]}', "unknown preprocess"),  # JSON text is what files record, not CLI text
    ],
)
def test_bad_preprocessing_is_one_line(spec, message):
    with pytest.raises(ModelError) as caught:
        Preprocess.parse(spec)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_value_is_a_name_or_mean_std_never_both_nor_neither():
    with pytest.raises(ModelError, match="not both"):
        Preprocess("unit", mean=(0.5,), std=(0.5,))
    with pytest.raises(ModelError, match="mean/std must be non-empty"):
        Preprocess()


@pytest.mark.parametrize("value", EVERY_KIND, ids=str)
def test_every_written_form_reads_back_equal(value):
    assert Preprocess.from_json(value.to_json()) == value  # model.json, sidecars
    assert Preprocess.from_json(json.loads(json.dumps(value.to_json()))) == value  # through a file
    assert Preprocess.from_json(value.to_metadata()) == value  # ONNX metadata_props
    assert Preprocess.parse(str(value)) == value  # the command line
    assert hash(Preprocess.parse(str(value))) == hash(value)


def test_json_forms_are_the_ones_stored_before():
    """A name is stored as the bare string, mean/std as {"mean": [...], "std": [...]} (in that
    order) in model.json and as the JSON text of that object in ONNX metadata."""
    value = Preprocess.parse(MEAN_STD)
    assert value.to_json() == MEAN_STD and list(value.to_json()) == ["mean", "std"]
    assert value.to_metadata() == json.dumps(MEAN_STD)
    assert Preprocess("raw").to_json() == Preprocess("raw").to_metadata() == "raw"
    assert parse_preprocess("mean=0.5 std=0.25") == {"mean": [0.5], "std": [0.25]}  # the former function
    assert parse_preprocess("imagenet") == "imagenet"


def test_recorded_json_text_must_be_valid():
    with pytest.raises(ModelError, match="recorded preprocess '{\"mean\": ' is not valid JSON"):
        Preprocess.from_json('{"mean": ')


def test_text_forms_read_well_in_messages():
    assert str(Preprocess("unit")) == "unit" and repr(Preprocess("unit")) == "Preprocess('unit')"
    value = Preprocess(mean=[0.5, 0.25], std=[0.2, 0.1])
    assert str(value) == "mean=0.5,0.25 std=0.2,0.1"
    assert repr(value) == "Preprocess(mean=(0.5, 0.25), std=(0.2, 0.1))"
    assert eval(repr(value)) == value  # noqa: S307 - the repr is the constructor call


def test_it_equals_the_former_str_and_dict_forms():
    assert Preprocess("raw") == "raw" and Preprocess("raw") != "unit" and Preprocess("raw") != "nonsense"
    assert Preprocess.parse(MEAN_STD) == MEAN_STD and Preprocess("unit") != MEAN_STD
    assert {Preprocess("raw"), "raw"} == {"raw"}  # equal values hash alike
    assert Preprocess("raw") != 255


@pytest.mark.parametrize(
    "spec, pixel, expected",
    [("unit", 0.5, 0.5), ("raw", 0.5, 127.5), ("inception", 0.25, -0.5), ({"mean": [0.5], "std": [0.25]}, 1.0, 2.0)],
)
def test_calling_it_maps_pixels_to_the_network_scale(spec, pixel, expected):
    x = torch.full((2, 1, 3, 3), pixel)
    out = Preprocess.parse(spec)(x)
    assert out.shape == x.shape and torch.allclose(out, torch.full_like(x, expected))


def test_imagenet_is_bgr_0_255_mean_centred_per_channel():
    x = torch.zeros(1, 3, 1, 1)
    x[0, 0] = 1.0  # pure red
    assert Preprocess("imagenet")(x).flatten().tolist() == pytest.approx([-103.939, -116.779, 255 - 123.68])


def test_per_channel_mean_std():
    x = torch.ones(1, 3, 2, 2)
    out = Preprocess.parse(MEAN_STD)(x)
    for c in range(3):
        assert torch.allclose(out[0, c], torch.tensor((1 - MEAN_STD["mean"][c]) / MEAN_STD["std"][c]))


def test_classifier_keeps_a_preprocess_however_it_is_given():
    net = build_classifier("digits_net").network
    model = Classifier(net, input_shape=(1, 16, 16), num_classes=10, preprocess={"mean": [0.5], "std": [0.25]})
    assert isinstance(model.preprocess, Preprocess) and model.preprocess == Preprocess(mean=(0.5,), std=(0.25,))
    x = torch.rand(3, 1, 16, 16)
    assert torch.allclose(model(x), net((x - 0.5) / 0.25))
    model.preprocess = "raw"  # assigning parses too
    assert isinstance(model.preprocess, Preprocess) and torch.allclose(model(x), net(x * 255))
    with pytest.raises(ModelError, match="unknown preprocess"):
        model.preprocess = "zscore"
    assert model.describe()["preprocess"] == "raw"
    assert build_classifier("resnet20").describe()["preprocess"] == MEAN_STD  # the architecture's own


def test_model_json_is_written_as_before(tmp_path):
    """model.json holds the plain JSON value: the same bytes as when preprocessing was a dict."""
    model = build_classifier("digits_net", preprocess="mean=0.1307 std=0.3081")
    save_model(model, tmp_path / "m")
    text = (tmp_path / "m" / "model.json").read_text()
    info = {"format": "deepdot-model", "version": 1, **model.describe()}
    info["preprocess"] = {"mean": [0.1307], "std": [0.3081]}
    assert text == json.dumps(info, indent=2) + "\n"
    assert load_model(tmp_path / "m").preprocess == model.preprocess
    assert load_model(tmp_path / "m", preprocess="inception").preprocess == "inception"  # the caller's wins


def test_the_mismatch_message_shows_the_preprocessing_as_typed():
    from deepdot.scan.base import check_clean_accuracy

    model = build_classifier("digits_net", preprocess={"mean": [1.0], "std": [1.0]})
    with pytest.raises(PreprocessingMismatch) as caught:
        check_clean_accuracy(model, load_data("digits:test"), minimum=1.01)
    assert "the model uses preprocess 'mean=1.0 std=1.0'; try raw" in str(caught.value)
    model.preprocess = "unit"
    with pytest.raises(PreprocessingMismatch, match="uses preprocess 'unit'; try raw"):
        check_clean_accuracy(model, load_data("digits:test"), minimum=1.01)


def test_the_checkpoint_key_holds_the_json_value(tmp_path):
    """The resume key (and so its digest) is what it was when preprocessing was a dict."""
    from deepdot.cli.scan import _checkpoint, make_scanner

    model = build_classifier("digits_net", preprocess={"mean": [0.5], "std": [0.25]})
    save_model(model, tmp_path / "m")
    data = load_data("digits:test").take(60, seed=0)
    checkpoint, done = _checkpoint(tmp_path / "out", tmp_path / "m", model, data, make_scanner("fast"), None, True)
    assert done == {} and checkpoint.key["preprocess"] == {"mean": [0.5], "std": [0.25]}
    stored = json.loads((tmp_path / "out" / ".checkpoint" / "key.json").read_text())
    assert stored["key"]["preprocess"] == {"mean": [0.5], "std": [0.25]}
    legacy = {**checkpoint.key, "preprocess": {"mean": [0.5], "std": [0.25]}}
    assert checkpoint.digest == hashlib.sha256(json.dumps(legacy, sort_keys=True, default=str).encode()).hexdigest()
