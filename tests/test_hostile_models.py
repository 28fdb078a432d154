"""Hostile Keras and ONNX model files: each problem is refused with one line naming the file.

The files are written directly (h5py for Keras' HDF5 layout, ``onnx.helper`` for ONNX), so each
test plants exactly one defect in an otherwise valid, tiny model: data shorter or longer than a
tensor's shape says, sizes over the limit, links and storage that reach into other files, a
malformed model config, graphs out of order, and the like.
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest

from deepdot.errors import ModelError
from deepdot.io.models import load_model


def _error(path: Path, *needles: str) -> str:
    """The one-line ModelError that loading ``path`` raises, which must contain ``needles``."""
    with pytest.raises(ModelError) as info:
        load_model(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    assert "Traceback" not in message
    for needle in needles:
        assert needle in message, message
    return message


# -- Keras HDF5 (the Keras 2 layout Neural Cleanse ships) ------------------------------------------
def _layers(units: int = 3) -> list[dict]:
    return [
        {"class_name": "InputLayer", "config": {"name": "input", "batch_input_shape": [None, 4, 4, 1]}},
        {"class_name": "Flatten", "config": {"name": "flatten"}},
        {"class_name": "Dense", "config": {"name": "dense", "units": units, "activation": "linear"}},
    ]


def _keras_h5(path: Path, config=None, kernel=None, bias=None, raw_config: bytes | None = None) -> Path:
    """A Sequential Keras HDF5 model: 4×4×1 images, Flatten, Dense(3)."""
    config = {"class_name": "Sequential", "config": {"name": "m", "layers": _layers()}} if config is None else config
    with h5py.File(path, "w") as f:
        f.attrs["model_config"] = raw_config if raw_config is not None else json.dumps(config).encode()
        group = f.create_group("model_weights").create_group("dense")
        group.attrs["weight_names"] = [b"dense/kernel:0", b"dense/bias:0"]
        rng = np.random.default_rng(0)
        group["dense/kernel:0"] = rng.normal(size=(16, 3)).astype("float32") if kernel is None else kernel
        group["dense/bias:0"] = np.zeros(3, "float32") if bias is None else bias
    return path


def test_handmade_keras_file_loads(tmp_path):
    classifier = load_model(_keras_h5(tmp_path / "ok.h5"))
    assert classifier.input_shape == (1, 4, 4) and classifier.num_classes == 3


def test_keras_weight_of_the_wrong_shape(tmp_path):
    path = _keras_h5(tmp_path / "bias.h5", bias=np.zeros(1, "float32"))  # would broadcast silently
    _error(path, "layer 'dense'", "'bias'", "expected 3")


def test_keras_weight_stored_shorter_than_its_shape(tmp_path):
    path = _keras_h5(tmp_path / "short.h5")
    with h5py.File(path, "r") as f:
        ds = f["model_weights/dense/dense/kernel:0"]
        offset, nbytes = ds.id.get_offset(), ds.id.get_storage_size()
    data = bytearray(path.read_bytes())
    # The data set's dataspace says 16×3; make the file say the same data is 32×3 by doubling
    # the first dimension in its header (the only 16 followed by 3 in the file's metadata).
    header = np.array([16, 3], "<u8").tobytes()
    at = data.find(header)
    assert at != -1 and not offset <= at < offset + nbytes
    data[at : at + 8] = np.array([32], "<u8").tobytes()
    data[at + 16 : at + 24] = np.array([32], "<u8").tobytes()  # the dataspace's maximum dimensions
    path.write_bytes(bytes(data))
    _error(path, "'dense/kernel'", "declares shape (32, 3)", f"stores {nbytes} bytes")


def test_keras_weights_over_the_size_limit(tmp_path, monkeypatch):
    path = _keras_h5(tmp_path / "big.h5", config=None)
    monkeypatch.setenv("DEEPDOT_MAX_MODEL_MB", "1")
    with h5py.File(path, "r+") as f:
        del f["model_weights/dense/dense/kernel:0"]
        f.create_dataset("model_weights/dense/dense/kernel:0", shape=(1 << 20, 3), dtype="float32", chunks=(1024, 3))
    _error(path, "weights would take", "DEEPDOT_MAX_MODEL_MB")


def test_keras_external_link_is_refused(tmp_path):
    secret = tmp_path / "secret.h5"
    with h5py.File(secret, "w") as f:
        f["kernel"] = np.ones((16, 3), "float32")
    path = _keras_h5(tmp_path / "link.h5")
    with h5py.File(path, "r+") as f:
        del f["model_weights/dense/dense/kernel:0"]
        f["model_weights/dense/dense/kernel:0"] = h5py.ExternalLink(str(secret), "/kernel")
    _error(path, "refused", "another file", "self-contained")


def test_keras_external_storage_is_refused(tmp_path):
    raw = tmp_path / "kernel.bin"
    raw.write_bytes(np.ones((16, 3), "float32").tobytes())
    path = _keras_h5(tmp_path / "external.h5")
    with h5py.File(path, "r+") as f:
        del f["model_weights/dense/dense/kernel:0"]
        f.create_dataset("model_weights/dense/dense/kernel:0", shape=(16, 3), dtype="float32", external=[(raw, 0, 192)])
    _error(path, "refused", "external files")


def test_keras_virtual_dataset_is_refused(tmp_path):
    source = tmp_path / "source.h5"
    with h5py.File(source, "w") as f:
        f["kernel"] = np.ones((16, 3), "float32")
    path = _keras_h5(tmp_path / "virtual.h5")
    layout = h5py.VirtualLayout(shape=(16, 3), dtype="float32")
    layout[:] = h5py.VirtualSource(str(source), "kernel", shape=(16, 3))
    with h5py.File(path, "r+") as f:
        del f["model_weights/dense/dense/kernel:0"]
        f["model_weights/dense"].create_virtual_dataset("dense/kernel:0", layout)
    _error(path, "refused", "virtual data set")


@pytest.mark.parametrize(
    ("raw", "needles"),
    [
        (b"{not json", ("corrupt or unsupported Keras model", "JSONDecodeError")),
        (b"\xff\xfe{}", ("corrupt or unsupported Keras model",)),
        (b"[1, 2, 3]", ("model config is a JSON list",)),
        (json.dumps({"class_name": "Sequential", "config": {"layers": "dense"}}).encode(), ("no list of layers",)),
        (json.dumps({"class_name": "Sequential", "config": {"layers": [1, 2]}}).encode(), ("not a JSON object",)),
        (json.dumps({"class_name": "Functional", "config": []}).encode(), ("not a JSON object",)),
        (json.dumps({"class_name": "Functional", "config": {"layers": []}}).encode(), ("0 inputs",)),
        (json.dumps({"class_name": {"x": 1}}).encode(), ("unsupported Keras model class",)),
        (b'{"class_name": "Sequential", "config": ' + b"[" * 5000 + b"]" * 5000 + b"}", ("corrupt or unsupported",)),
        (json.dumps({"class_name": "Sequential", "config": {"layers": [{"a": [[[[[[[[1]]]]]]]]}] * 2}}).encode(), ()),
    ],
    ids=[
        "not-json",
        "not-utf8",
        "list",
        "layers-string",
        "layer-number",
        "functional-list",
        "no-input",
        "odd-class",
        "deep-nesting",
        "unknown-layers",
    ],
)
def test_malformed_keras_config(tmp_path, raw, needles):
    _error(_keras_h5(tmp_path / "config.h5", raw_config=raw), *needles)


def test_keras_config_nested_too_deep(tmp_path):
    nested: dict = {}
    inner = nested
    for _ in range(80):
        inner["x"] = {}
        inner = inner["x"]
    config = {"class_name": "Sequential", "config": {"name": "m", "layers": _layers(), "extra": nested}}
    _error(_keras_h5(tmp_path / "deep.h5", config=config), "nested more than 64 levels")


def test_keras_wrong_types_in_a_layer(tmp_path):
    layers = _layers()
    layers[2]["config"]["activation"] = {"class_name": "Evil"}
    config = {"class_name": "Sequential", "config": {"name": "m", "layers": layers}}
    _error(_keras_h5(tmp_path / "activation.h5", config=config), "unsupported activation")
    layers = _layers()
    layers[0]["config"]["batch_input_shape"] = [None, "four", 4, 1]
    config = {"class_name": "Sequential", "config": {"name": "m", "layers": layers}}
    _error(_keras_h5(tmp_path / "shape.h5", config=config), "corrupt or unsupported Keras model")


def test_keras_huge_input_or_padding_is_refused(tmp_path):
    layers = _layers()
    layers[0]["config"]["batch_input_shape"] = [None, 100_000, 100_000, 1]
    config = {"class_name": "Sequential", "config": {"name": "m", "layers": layers}}
    _error(_keras_h5(tmp_path / "input.h5", config=config), "input images", "DEEPDOT_MAX_IMAGE_PIXELS")
    layers = _layers()
    layers.insert(1, {"class_name": "ZeroPadding2D", "config": {"name": "pad", "padding": 50_000}})
    config = {"class_name": "Sequential", "config": {"name": "m", "layers": layers}}
    _error(_keras_h5(tmp_path / "pad.h5", config=config), "pads by 50000 pixels")


def test_keras_lambda_layer_stays_refused(tmp_path):
    layers = _layers()
    layers.insert(1, {"class_name": "Lambda", "config": {"name": "code", "function": "4wEAAAAAAAAA"}})
    config = {"class_name": "Sequential", "config": {"name": "m", "layers": layers}}
    _error(_keras_h5(tmp_path / "lambda.h5", config=config), "unsupported Keras layer type 'Lambda'")


@pytest.mark.timeout(60, method="thread")
def test_keras_global_heap_that_hdf5_would_decode_forever(tmp_path):
    """A zero-sized free-space object in the heap holding model_config: HDF5 would loop forever."""
    path = _keras_h5(tmp_path / "heap.h5", raw_config=None)
    with h5py.File(path, "r+") as f:  # a variable-length string, as Keras 3 writes it
        f.attrs["model_config"] = json.dumps({"class_name": "Sequential", "config": {"layers": _layers()}})
    data = bytearray(path.read_bytes())
    start = data.find(b"GCOL")
    assert start != -1
    data[start + 16 : start + 32] = bytes(16)  # the first object: index 0 (free space), size 0
    path.write_bytes(bytes(data))
    _error(path, "global heap")


def test_empty_and_garbage_keras_files(tmp_path):
    (tmp_path / "empty.h5").write_bytes(b"")
    _error(tmp_path / "empty.h5", "empty")
    (tmp_path / "garbage.keras").write_bytes(b"PK\x03\x04" + bytes(100))
    _error(tmp_path / "garbage.keras", "corrupt, truncated or not a Keras .keras model")
    # A zip64 end record claiming several disks: zipfile.is_zipfile itself raises on it.
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 1, 0, 2)
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0, 0, 0, 0, 0)
    for name in ("disks.keras", "disks.h5"):
        (tmp_path / name).write_bytes(bytes(64) + locator + end)
        _error(tmp_path / name, "corrupt, truncated", "span multiple disks")


# -- Keras .keras archives ------------------------------------------------------------------------
def _keras_zip(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members:
            archive.writestr(name, data)
    return path


def _keras_zip_members(tmp_path: Path) -> list[tuple[str, bytes]]:
    weights = tmp_path / "weights.h5"
    with h5py.File(weights, "w") as f:
        f["layers/dense/vars/0"] = np.ones((16, 3), "float32")
        f["layers/dense/vars/1"] = np.zeros(3, "float32")
    config = {"class_name": "Sequential", "config": {"name": "m", "layers": _layers()}}
    return [("config.json", json.dumps(config).encode()), ("model.weights.h5", weights.read_bytes())]


def test_handmade_keras_archive_loads(tmp_path):
    assert load_model(_keras_zip(tmp_path / "ok.keras", _keras_zip_members(tmp_path))).num_classes == 3


def test_keras_archive_with_duplicate_members_is_refused(tmp_path):
    members = _keras_zip_members(tmp_path)
    evil = ("config.json", json.dumps({"class_name": "Sequential", "config": {"layers": []}}).encode())
    with pytest.warns(UserWarning, match="Duplicate name"):
        path = _keras_zip(tmp_path / "dup.keras", [*members, evil])
    _error(path, "refused", "two members named 'config.json'")


def test_keras_archive_member_over_the_size_limit(tmp_path, monkeypatch):
    members = [*_keras_zip_members(tmp_path), ("assets/bomb.bin", bytes(3 << 20))]  # compresses to a few KB
    path = _keras_zip(tmp_path / "bomb.keras", members)
    assert path.stat().st_size < 100_000
    monkeypatch.setenv("DEEPDOT_MAX_MODEL_MB", "2")
    _error(path, "unpacked members would take", "DEEPDOT_MAX_MODEL_MB")


def test_keras_archive_without_its_config(tmp_path):
    _error(_keras_zip(tmp_path / "noconfig.keras", _keras_zip_members(tmp_path)[1:]), "no config.json")


def test_keras_archive_weights_with_an_external_link(tmp_path):
    members = _keras_zip_members(tmp_path)
    weights = tmp_path / "linked.h5"
    with h5py.File(weights, "w") as f:
        f["layers/dense/vars/0"] = h5py.ExternalLink(str(tmp_path / "weights.h5"), "/layers/dense/vars/0")
        f["layers/dense/vars/1"] = np.zeros(3, "float32")
    path = _keras_zip(tmp_path / "linked.keras", [members[0], ("model.weights.h5", weights.read_bytes())])
    _error(path, "refused", "another file")


# -- ONNX -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def onnx():
    return pytest.importorskip("onnx")


def _onnx_model(onnx, weight=None, nodes=None, initializers=None):
    """x (N×1×4×4) -> Flatten -> Gemm(W 3×16, B 3) -> y, with optional replacements."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if weight is None:
        weight = numpy_helper.from_array(rng.normal(size=(3, 16)).astype("float32"), "W")
    inits = [weight, numpy_helper.from_array(np.zeros(3, "float32"), "B")] if initializers is None else initializers
    nodes = nodes or [
        helper.make_node("Flatten", ["x"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "W", "B"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _save(onnx, model, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def _tensor(name: str, data_type: int, dims: list[int], **data) -> object:
    """A TensorProto exactly as given (``onnx.helper.make_tensor`` refuses inconsistent ones)."""
    from onnx import TensorProto

    tensor = TensorProto(name=name, data_type=data_type, dims=dims)
    for field, values in data.items():
        getattr(tensor, field).extend(values)
    return tensor


def test_handmade_onnx_file_loads(onnx, tmp_path):
    classifier = load_model(_save(onnx, _onnx_model(onnx), tmp_path / "ok.onnx"), input_shape=(1, 4, 4))
    assert classifier.num_classes == 3


@pytest.mark.parametrize("change", [-4, 4, -48])
def test_onnx_raw_data_shorter_or_longer_than_its_dims(onnx, tmp_path, change):
    """The known bug: raw data that does not match the dims ended in a traceback."""
    from onnx import numpy_helper

    weight = numpy_helper.from_array(np.ones((3, 16), "float32"), "W")
    weight.raw_data = weight.raw_data[:change] if change < 0 else weight.raw_data + bytes(change)
    path = _save(onnx, _onnx_model(onnx, weight=weight), tmp_path / "raw.onnx")
    _error(path, "tensor 'W'", "declares shape [3, 16]", f"holds {192 + change} bytes")


def test_onnx_typed_data_count_differs_from_its_dims(onnx, tmp_path):
    from onnx import TensorProto

    weight = _tensor("W", TensorProto.FLOAT, [3, 16], float_data=[1.0] * 40)
    _error(_save(onnx, _onnx_model(onnx, weight=weight), tmp_path / "typed.onnx"), "tensor 'W'", "holds 40 values")


def test_onnx_constant_node_with_short_data(onnx, tmp_path):
    from onnx import TensorProto, helper

    value = _tensor("shape", TensorProto.INT64, [2])
    nodes = [
        helper.make_node("Constant", [], ["shape"], name="const", value=value),
        helper.make_node("Reshape", ["x", "shape"], ["flat"], name="reshape"),
        helper.make_node("Gemm", ["flat", "W", "B"], ["y"], name="fc", transB=1),
    ]
    _error(_save(onnx, _onnx_model(onnx, nodes=nodes), tmp_path / "const.onnx"), "tensor 'shape'", "holds 0 values")


def test_onnx_weights_over_the_size_limit(onnx, tmp_path, monkeypatch):
    from onnx import TensorProto

    weight = _tensor("W", TensorProto.FLOAT, [1 << 20, 1 << 20])  # declares 4 TB, holds nothing
    _error(_save(onnx, _onnx_model(onnx, weight=weight), tmp_path / "huge.onnx"), "weights would take", "MB")
    monkeypatch.setenv("DEEPDOT_MAX_MODEL_MB", "1")
    path = _save(onnx, _onnx_model(onnx), tmp_path / "fine.onnx")
    path.write_bytes(path.read_bytes() + bytes(2 << 20))  # a file over the limit is not even parsed
    _error(path, "the ONNX file would take")


def test_onnx_external_data_is_still_refused(onnx, tmp_path):
    from onnx import TensorProto

    weight = _tensor("W", TensorProto.FLOAT, [3, 16])
    weight.data_location = TensorProto.EXTERNAL
    weight.external_data.add(key="location", value="../../etc/passwd")
    _error(_save(onnx, _onnx_model(onnx, weight=weight), tmp_path / "ext.onnx"), "stored in an external file")


def test_onnx_unknown_data_type(onnx, tmp_path):
    from onnx import TensorProto, helper

    weight = helper.make_tensor("W", TensorProto.STRING, [1], [b"x"])
    _error(_save(onnx, _onnx_model(onnx, weight=weight), tmp_path / "str.onnx"), "data type STRING")


def test_onnx_graph_out_of_order_or_missing_a_tensor(onnx, tmp_path):
    from onnx import helper

    nodes = [
        helper.make_node("Gemm", ["flat", "W", "B"], ["y"], name="fc", transB=1),
        helper.make_node("Flatten", ["x"], ["flat"], name="flatten"),
    ]
    path = _save(onnx, _onnx_model(onnx, nodes=nodes), tmp_path / "order.onnx")
    _error(path, "corrupt or unsupported ONNX model", "reads tensor 'flat'")
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="relu"),
        helper.make_node("Add", ["a", "nowhere"], ["b"], name="add"),
        helper.make_node("Flatten", ["b"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "W", "B"], ["y"], name="fc", transB=1),
    ]
    _error(_save(onnx, _onnx_model(onnx, nodes=nodes), tmp_path / "missing.onnx"), "reads tensor 'nowhere'")


@pytest.mark.timeout(60, method="thread")
def test_onnx_identity_cycle_before_the_output(onnx, tmp_path):
    from onnx import helper

    nodes = [
        helper.make_node("Identity", ["z"], ["y"], name="a"),
        helper.make_node("Identity", ["y"], ["z"], name="b"),
    ]
    _error(_save(onnx, _onnx_model(onnx, nodes=nodes), tmp_path / "cycle.onnx"), "ONNX model")


def test_onnx_malformed_attributes_and_padding(onnx, tmp_path):
    from onnx import helper

    nodes = [
        helper.make_node("MaxPool", ["x"], ["p"], name="pool", kernel_shape=[2, 2], pads=[9999, 9999, 9999, 9999]),
        helper.make_node("Flatten", ["p"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "W", "B"], ["y"], name="fc", transB=1),
    ]
    _error(_save(onnx, _onnx_model(onnx, nodes=nodes), tmp_path / "pads.onnx"), "pads by 9999 pixels")
    nodes[0] = helper.make_node("MaxPool", ["x"], ["p"], name="pool", kernel_shape=2.5)
    _error(_save(onnx, _onnx_model(onnx, nodes=nodes), tmp_path / "kernel.onnx"), "malformed 'kernel_shape'")
    nodes[0] = helper.make_node("MaxPool", ["x"], ["p"], name="pool")
    _error(_save(onnx, _onnx_model(onnx, nodes=nodes), tmp_path / "nokernel.onnx"), "no 'kernel_shape'")


def test_onnx_name_that_is_not_utf8(onnx, tmp_path):
    path = _save(onnx, _onnx_model(onnx), tmp_path / "name.onnx")
    data = path.read_bytes()
    path.write_bytes(data.replace(b"flatten", b"fl\xfftten", 1))
    _error(path, "not valid UTF-8")


def test_onnx_unexpected_failures_become_one_line(onnx, tmp_path, monkeypatch):
    """The structural net: whatever a converter raises becomes 'corrupt or unsupported' + reason."""
    from deepdot.io import keras_h5, onnx_import

    path = _save(onnx, _onnx_model(onnx), tmp_path / "ok.onnx")
    for exc in (MemoryError(), RecursionError("maximum recursion depth exceeded"), KeyError("x"), AttributeError("a")):

        def fail(*_args, exc=exc, **_kwargs):
            raise exc

        monkeypatch.setattr(onnx_import, "_convert_graph", fail)
        _error(path, "corrupt or unsupported ONNX model", type(exc).__name__)
        monkeypatch.setattr(keras_h5, "convert_config", fail)
        _error(_keras_h5(tmp_path / "ok.h5"), "corrupt or unsupported Keras model", type(exc).__name__)
