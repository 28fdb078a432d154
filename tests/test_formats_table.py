"""The one table of model formats (deepdot.io.formats): which format a path is, and that loading,
``model_file`` and writing a model back (save_as) all consult it. Each writable format keeps a
model's preprocessing through a write and a reload."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pytest
import torch

from deepdot.errors import ModelError
from deepdot.io import formats
from deepdot.io.formats import (
    DEEPDOT,
    KERAS,
    MODEL_FORMATS,
    ONNX,
    STATE_DICT,
    TORCHSCRIPT,
    ModelFormat,
    find_format,
    format_for,
    format_named,
)
from deepdot.io.models import KERAS_SUFFIXES, ONNX_SUFFIXES, TORCH_SUFFIXES, load_model, model_file, save_model
from deepdot.io.save_as import SAVE_KINDS, SaveFormat, save_format, save_model_as
from deepdot.models import Preprocess, build_classifier

MEAN_STD = {"mean": [0.1307], "std": [0.3081]}
READS = ".safetensors, .h5, .hdf5, .keras, .onnx, .pt, .pth, .ts, .torchscript, .bin"


@pytest.fixture(scope="module")
def digits() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_classifier("digits_net", preprocess=MEAN_STD)


def test_the_table_names_each_format_once_with_its_suffixes():
    assert [f.name for f in MODEL_FORMATS] == ["deepdot", "keras", "onnx", "torchscript", "state_dict"]
    assert SAVE_KINDS == ("deepdot", "keras", "onnx", "torchscript", "state_dict")
    assert formats.suffixes() == tuple(READS.split(", "))
    assert formats.file_suffixes() == formats.suffixes()[1:]
    assert (KERAS_SUFFIXES, ONNX_SUFFIXES, TORCH_SUFFIXES) == (KERAS.suffixes, ONNX.suffixes, TORCHSCRIPT.suffixes)
    assert all(format_named(f.name) is f for f in MODEL_FORMATS)
    with pytest.raises(ModelError, match="unknown model format 'tflite'; deepdot knows deepdot, keras"):
        format_named("tflite")


def test_format_for_goes_by_suffix_and_for_pytorch_files_by_content(tmp_path, digits):
    folder = tmp_path / "folder"
    folder.mkdir()
    for name in ("folder", "m.safetensors", "model.json", "no_suffix"):
        assert format_for(tmp_path / name) is DEEPDOT
    assert format_for(tmp_path / "a.H5") is KERAS and format_for(tmp_path / "a.keras") is KERAS
    assert format_for(tmp_path / "a.onnx") is ONNX
    scripted = tmp_path / "a.pt"
    torch.jit.script(digits.network).save(str(scripted))
    weights = tmp_path / "b.pt"
    torch.save(digits.network.state_dict(), weights)
    assert format_for(scripted) is TORCHSCRIPT and format_for(weights) is STATE_DICT
    assert format_for(tmp_path / "absent.bin") is STATE_DICT


def test_an_unknown_suffix_is_the_same_one_line_error_everywhere(tmp_path, digits):
    path = tmp_path / "model.tflite"
    path.write_bytes(b"\0" * 16)
    expected = f"{path}: unsupported model format '.tflite'; deepdot reads {READS} and folders"
    assert find_format(path) is None
    for call in (lambda: format_for(path), lambda: load_model(path)):
        with pytest.raises(ModelError) as caught:
            call()
        assert str(caught.value) == expected
    with pytest.raises(ModelError) as caught:
        save_format(digits, path)
    assert str(caught.value) == f"{path}: unsupported model format '.tflite'; cannot write a model in it"
    with pytest.raises(ModelError, match="no such model file"):
        load_model(tmp_path / "absent.tflite")  # a missing file is reported as missing first
    with pytest.raises(ModelError, match="unknown model format 'tflite'; deepdot writes deepdot, keras"):
        save_model_as(digits, path, tmp_path / "out", fmt=SaveFormat("tflite", ".tflite"))


def test_loading_model_file_and_saving_consult_the_table(tmp_path, monkeypatch, digits):
    """A format added to the table is read by load_model, found by model_file and written by
    save_model_as: nothing else decides formats."""
    calls = []

    def read(path, *, preprocess, arch, allow_code, input_shape):
        calls.append(("read", path.name))
        return build_classifier("digits_net", preprocess=preprocess or json.loads(path.read_text())["preprocess"])

    def write(classifier, source, path):
        calls.append(("write", source.name))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"preprocess": classifier.preprocess.to_json()}))
        return [path]

    fake = ModelFormat("fake", "Fake", (".fake",), read, write)
    monkeypatch.setattr(formats, "MODEL_FORMATS", (*MODEL_FORMATS, fake))
    source = tmp_path / "in" / "model.fake"
    source.parent.mkdir()
    source.write_text(json.dumps({"preprocess": "raw"}))
    assert model_file(source.parent) == source  # a folder holding one model.<suffix> stands for it
    loaded = load_model(source.parent)
    assert loaded.preprocess == "raw" and calls == [("read", "model.fake")]
    assert save_format(loaded, source) == SaveFormat("fake", ".fake")
    written = save_model_as(loaded, source, tmp_path / "out")
    assert written == [tmp_path / "out" / "model.fake"] and calls[-1] == ("write", "model.fake")
    assert load_model(written[0]).preprocess == "raw"


def _sources(tmp_path: Path, digits) -> dict[str, tuple[Path, Preprocess | None]]:
    """A file of each writable format holding ``digits`` (and the --preprocess it needs, if any)."""
    from deepdot.io.export import export_keras_h5, export_onnx

    pytest.importorskip("onnx")
    os.environ.setdefault("KERAS_BACKEND", "torch")
    pytest.importorskip("keras")
    folder = tmp_path / "sources"
    scripted = folder / "scripted.pt"
    folder.mkdir()
    meta = {"input_shape": [1, 16, 16], "preprocess": MEAN_STD}
    torch.jit.script(digits.network).save(str(scripted), _extra_files={"model.json": json.dumps(meta)})
    weights = folder / "weights.pth"
    torch.save(digits.network.state_dict(), weights)
    weights.with_suffix(".json").write_text(json.dumps({"architecture": "digits_net", **meta}))
    return {
        "deepdot": (save_model(digits, folder / "native").parent, None),
        "keras": (export_keras_h5(digits, folder / "model.h5"), digits.preprocess),  # Keras records none
        "onnx": (export_onnx(digits, folder / "model.onnx"), None),
        "torchscript": (scripted, None),
        "state_dict": (weights, None),
    }


def test_each_writable_format_keeps_the_preprocessing(tmp_path, digits):
    x = torch.rand(8, 1, 16, 16)
    for kind, (source, given) in _sources(tmp_path, digits).items():
        loaded = load_model(source, preprocess=given)
        assert loaded.preprocess == Preprocess.parse(MEAN_STD), kind
        fmt = save_format(loaded, source)
        assert fmt.kind == kind
        paths = save_model_as(loaded, source, tmp_path / kind, fmt=fmt)
        assert paths[0] == fmt.file(tmp_path / kind) and all(p.is_file() for p in paths)
        again = load_model(paths[0])  # no --preprocess: the written files say it
        assert again.preprocess == loaded.preprocess and isinstance(again.preprocess, Preprocess), kind
        with torch.no_grad():
            assert torch.allclose(again(x).log_softmax(1), digits(x).log_softmax(1), atol=1e-4), kind
        beside = json.loads(paths[0].with_suffix(".json").read_text())
        assert beside["preprocess"] == MEAN_STD, kind  # model.json or the sidecar: the plain JSON value
    onnx = pytest.importorskip("onnx")
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "onnx" / "model.onnx")).metadata_props}
    assert props["preprocess"] == json.dumps(MEAN_STD)
    with zipfile.ZipFile(tmp_path / "torchscript" / "model.pt") as archive:
        embedded = [n for n in archive.namelist() if n.endswith("extra/model.json")]
        assert json.loads(archive.read(embedded[0]))["preprocess"] == MEAN_STD
