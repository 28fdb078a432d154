"""Keras full-model files (HDF5 ``.h5`` and Keras 3 ``.keras``) converted to PyTorch.

Neural Cleanse and most backdoor-research code ship their models as Keras HDF5 files written by
``model.save(...)``: the architecture as JSON in the ``model_config`` attribute and the weights
under ``model_weights/<layer>/``. This module reads both with h5py (no TensorFlow or Keras
needed, and no code from the file is ever run) and rebuilds the model from standard PyTorch
layers, so deepdot can take gradients through it.

Supported: Sequential and Functional models (one input, one output, no shared layers) made of
InputLayer, Conv2D, Dense, MaxPooling2D, AveragePooling2D, GlobalAverage/MaxPooling2D,
BatchNormalization, Dropout (and its variants), Flatten, Activation, ReLU, LeakyReLU, Softmax,
ZeroPadding2D, Add and Concatenate. Keras is channels-last: the converted network takes
N×C×H×W input like every deepdot model; kernels are transposed and ``Flatten`` keeps the Keras
(H, W, C) order so the dense weights apply unchanged.
"""

from __future__ import annotations

import io
import json
import math
import mmap
import shutil
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deepdot.errors import DeepdotError, ModelError
from deepdot.io.convert import (
    Add,
    ChannelsLastFlatten,
    Concat,
    ConvertedModel,
    GraphNetwork,
    SameAvgPool2d,
    SamePad2d,
    Step,
    batch_norm,
    chain,
    check_input_shape,
    check_padding,
    module_name,
    short_reason,
)
from deepdot.io.files import replacing
from deepdot.io.limits import MODEL_BYTES, Budget, weights_budget

SUPPORTED_LAYERS = (
    "InputLayer",
    "Conv2D",
    "Dense",
    "MaxPooling2D",
    "AveragePooling2D",
    "GlobalAveragePooling2D",
    "GlobalMaxPooling2D",
    "BatchNormalization",
    "Dropout",
    "SpatialDropout2D",
    "GaussianNoise",
    "GaussianDropout",
    "AlphaDropout",
    "Flatten",
    "Activation",
    "ReLU",
    "LeakyReLU",
    "Softmax",
    "ZeroPadding2D",
    "Add",
    "Concatenate",
)
_IDENTITY_LAYERS = {"Dropout", "SpatialDropout2D", "GaussianNoise", "GaussianDropout", "AlphaDropout"}
_ALIASES = {"Convolution2D": "Conv2D", "MaxPool2D": "MaxPooling2D", "AvgPool2D": "AveragePooling2D"}

#: Reads the weights of one layer: (layer name, layer class) -> {"kernel": array, "bias": array, ...}.
WeightReader = Callable[[str, str], dict[str, np.ndarray]]


class _Unsupported(Exception):
    """A layer or setting the converter does not handle (turned into a ModelError with the file name)."""


class _Corrupt(Exception):
    """HDF5 could not read the file's structure (turned into a ModelError with the file name)."""


def load_keras(path: str | Path) -> ConvertedModel:
    """Convert a Keras full-model file (``.h5``/``.hdf5`` or ``.keras``) to PyTorch.

    The file is hostile input: it must be self-contained (no HDF5 external links, external
    storage or virtual datasets), its archive members and weights are bounded in size
    (:data:`~deepdot.io.limits.MODEL_BYTES`) before they are read, every weight must hold the
    data its shape declares, and the model config must be well-formed JSON of sane depth.
    Whatever else goes wrong while reading or converting the file becomes a one-line
    ``ModelError``, never a traceback.

    Raises:
        ModelError: unreadable or truncated file, a weights-only file, an unsupported layer.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as exc:
        raise ModelError(f"{p}: cannot read ({exc.strerror or exc})") from exc
    MODEL_BYTES.check(size, f"{p}: the Keras file", ModelError)
    if size == 0:
        raise ModelError(f"{p}: the file is empty; not a Keras model")
    is_zip = p.suffix.lower() == ".keras"
    try:
        is_zip = zipfile.is_zipfile(p)  # raises BadZipFile on some damaged end records
        return _load_keras_zip(p) if is_zip else _load_keras_h5(p)
    except DeepdotError:
        raise
    except _Unsupported as exc:
        raise ModelError(f"{p}: {exc}") from exc
    except (OSError, EOFError, zipfile.BadZipFile, _Corrupt) as exc:  # HDF5 or zip cannot read the bytes
        kind = ".keras" if is_zip or p.suffix.lower() == ".keras" else "HDF5"
        reason = str(exc) if isinstance(exc, _Corrupt) else short_reason(exc)
        raise ModelError(f"{p}: corrupt, truncated or not a Keras {kind} model ({reason})") from exc
    except Exception as exc:  # noqa: BLE001 - a hostile file can make parsing or converting fail in any way
        raise ModelError(f"{p}: corrupt or unsupported Keras model ({short_reason(exc)})") from exc


def _load_keras_h5(p: Path) -> ConvertedModel:
    import h5py

    with open(p, "rb") as stream, mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) as image:
        check_global_heaps(image, p)
    with h5py.File(p, "r") as f:
        check_self_contained(f, p)
        raw = f.attrs.get("model_config")
        if raw is None:
            raise ModelError(
                f"{p}: HDF5 file without a model_config attribute (a weights-only file or not a Keras "
                "model); deepdot needs a full model written by model.save()"
            )
        config = _parse_config(raw)
        root = f["model_weights"] if "model_weights" in f else f
        return convert_config(config, _h5_weight_reader(root, weights_budget(p)), p)


# -- hostile files ---------------------------------------------------------------------------
#: HDF5's own filters (gzip, shuffle, fletcher32, szip, nbit, scaleoffset) and h5py's lzf; any
#: other filter would be a plugin library HDF5 loads from disk to decode the data.
_BUILTIN_FILTERS = {1, 2, 3, 4, 5, 6, 32000}
#: Most HDF5 objects and links a model file may hold (Keras files hold a few hundred).
_MAX_HDF5_OBJECTS = 100_000
#: Deepest nesting of the model config JSON (Keras configs nest about a dozen levels).
_MAX_CONFIG_DEPTH = 64


def check_self_contained(f: Any, path: Path) -> None:
    """Refuse an HDF5 file that reaches outside itself or decodes through a plugin.

    Every object reachable in ``f`` is visited once: a link into another file (external link,
    or a link kind h5py does not know), a data set whose data live in other files (external
    storage, virtual data sets) or one encoded with a filter that is not HDF5's own raises a
    one-line ``ModelError``. Nothing outside ``f`` is opened.
    """
    import h5py

    seen = 0

    def check_links(group: Any, prefix: str) -> None:
        nonlocal seen
        for member in group:
            seen += 1
            if seen > _MAX_HDF5_OBJECTS:
                raise ModelError(f"{path}: holds more than {_MAX_HDF5_OBJECTS:,} HDF5 objects; not a model file")
            link = group.get(member, getlink=True)
            name = f"{prefix}{member}"
            if isinstance(link, h5py.ExternalLink):
                raise ModelError(
                    f"{path}: refused: HDF5 link {name!r} points into another file ({link.filename!r}); "
                    "deepdot reads self-contained model files only"
                )
            if not isinstance(link, (h5py.HardLink, h5py.SoftLink)):
                raise ModelError(f"{path}: refused: HDF5 link {name!r} is a user-defined link")

    def check(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Group):
            check_links(obj, f"{name}/")
        elif isinstance(obj, h5py.Dataset):
            _check_dataset(obj, name, path)

    try:
        check_links(f, "")
        f.visititems(check)  # every object reachable by hard links, each once
    except DeepdotError:
        raise
    except Exception as exc:  # noqa: BLE001 - HDF5 reports damaged metadata in many ways
        raise _Corrupt(short_reason(exc)) from exc


_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
#: Most global heap objects deepdot walks through before giving up on a file.
_MAX_HEAP_OBJECTS = 1_000_000


def check_global_heaps(image: bytes | mmap.mmap, path: Path) -> None:
    """Refuse an HDF5 file holding a global heap collection that HDF5 would decode forever.

    Variable-length strings (such as Keras' ``model_config``) live in "global heap
    collections" (``GCOL``). HDF5 (2.0 included) walks a collection's objects by their sizes and
    loops forever, unstoppable from Python, on a free-space object of size 0, which a single
    damaged byte creates. Every collection in the file is walked here first, the way HDF5 does,
    and such a file refused with one line.
    """
    lengths = _sizeof_lengths(image)
    if lengths is None:  # no valid superblock: HDF5 will refuse the file itself
        return
    header = 8 + lengths  # "GCOL", version, 3 reserved bytes, collection size
    object_header = 8 + lengths  # heap index (2), reference count (2), 4 reserved bytes, object size
    walked = 0
    start = image.find(b"GCOL")
    while start != -1:
        end = start + _number(image, start + 8, lengths)
        if image[start + 4 : start + 5] != b"\x01" or end > len(image):
            end = 0  # not a collection HDF5 would decode (wrong version, or past the end of the file)
        at = start + header
        while at + object_header <= end:
            index = _number(image, at, 2)
            size = _number(image, at + 8, lengths)
            step = object_header + -(-size // 8) * 8 if index > 0 else size
            walked += 1
            if step == 0 or walked > _MAX_HEAP_OBJECTS:
                raise ModelError(
                    f"{path}: corrupt HDF5 file (global heap collection at byte {start} cannot be decoded)"
                )
            at += step
        start = image.find(b"GCOL", start + 1)


def _sizeof_lengths(image: bytes | mmap.mmap) -> int | None:
    """The "size of lengths" an HDF5 file's superblock declares (None without a superblock)."""
    offset = 0
    while offset + 16 <= len(image):  # the superblock is at 0, 512, 1024, 2048, …
        if image[offset : offset + 8] == _HDF5_SIGNATURE:
            version = image[offset + 8]
            lengths = image[offset + 14] if version in (0, 1) else image[offset + 10] if version in (2, 3) else 0
            return lengths if lengths in (2, 4, 8, 16, 32) else None
        offset = 512 if offset == 0 else offset * 2
    return None


def _number(image: bytes | mmap.mmap, at: int, width: int) -> int:
    """The little-endian number of ``width`` bytes at ``at`` (bytes past the end read as zero)."""
    return int.from_bytes(image[at : at + width].ljust(width, b"\0"), "little")


def _check_dataset(ds: Any, name: str, path: Path) -> None:
    if ds.is_virtual:
        raise ModelError(
            f"{path}: refused: data set {name!r} is a virtual data set drawing on other files; "
            "deepdot reads self-contained model files only"
        )
    if ds.external:
        raise ModelError(
            f"{path}: refused: data set {name!r} keeps its data in external files; "
            "deepdot reads self-contained model files only"
        )
    plist = ds.id.get_create_plist()
    for i in range(plist.get_nfilters()):
        code = plist.get_filter(i)[0]
        if code not in _BUILTIN_FILTERS:
            raise ModelError(f"{path}: refused: data set {name!r} is encoded with HDF5 filter plugin {code}")


def _read_weight(ds: Any, what: str, budget: Budget) -> np.ndarray:
    """A weight data set as float32, once its declared size is within the limit and, when stored
    in one piece, the file holds exactly the bytes its shape declares."""
    import h5py

    if not isinstance(ds, h5py.Dataset):
        raise _Unsupported(f"weight {what!r} is not a data set")
    if ds.shape is None or ds.dtype.kind not in "fiu":
        raise _Unsupported(f"weight {what!r} is not an array of numbers (shape {ds.shape}, type {ds.dtype})")
    count = math.prod(int(d) for d in ds.shape)
    nbytes = count * ds.dtype.itemsize
    budget.take(count * max(ds.dtype.itemsize, 4))
    layout = ds.id.get_create_plist().get_layout()
    if layout in (h5py.h5d.CONTIGUOUS, h5py.h5d.COMPACT) and nbytes and ds.id.get_storage_size() != nbytes:
        raise _Unsupported(
            f"weight {what!r} declares shape {tuple(ds.shape)} of {ds.dtype} ({nbytes} bytes) but the file "
            f"stores {ds.id.get_storage_size()} bytes (a corrupt or truncated file)"
        )
    return np.asarray(ds, dtype=np.float32)


def _parse_config(raw: Any) -> dict[str, Any]:
    """The model config JSON (``model_config`` attribute or ``config.json``) as a dict."""
    if isinstance(raw, np.ndarray) and raw.shape == ():
        raw = raw.item()
    if isinstance(raw, bytes):
        raw = raw.decode()
    if not isinstance(raw, str):
        raise _Unsupported(f"the model config is a {type(raw).__name__}, not JSON text")
    config = json.loads(raw)
    if not isinstance(config, dict):
        raise _Unsupported(f"the model config is a JSON {type(config).__name__}, not an object")
    stack: list[tuple[Any, int]] = [(config, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > _MAX_CONFIG_DEPTH:
            raise _Unsupported(f"the model config is nested more than {_MAX_CONFIG_DEPTH} levels deep")
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return config


def _h5_weight_reader(root: Any, budget: Budget) -> WeightReader:
    """Weights of a layer in a Keras 2 / Keras 3 legacy HDF5 file, keyed by short name."""

    def read(layer: str, _cls: str) -> dict[str, np.ndarray]:
        return {
            short: _read_weight(ds, f"{layer}/{short}", budget) for short, ds in _h5_layer_datasets(root, layer).items()
        }

    return read


def _h5_layer_datasets(root: Any, layer: str) -> dict[str, Any]:
    """A layer's weight datasets in a Keras HDF5 file by short name (``kernel``, ``bias``, …)."""
    if layer not in root:
        return {}
    group = root[layer]
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in group.attrs.get("weight_names", [])]
    return {name.split("/")[-1].split(":")[0]: group[name] for name in names}


# Keras 3 ``.keras`` files store each layer's variables as vars/0, vars/1, ... in this order.
_VARIABLE_ORDER = {
    "Conv2D": ("kernel", "bias"),
    "Dense": ("kernel", "bias"),
    "BatchNormalization": ("gamma", "beta", "moving_mean", "moving_variance"),
}


def _variable_names(cls: str, cfg: dict[str, Any]) -> list[str]:
    """Names of a layer's stored variables, in storage order (optional ones left out when unused)."""
    names = list(_VARIABLE_ORDER.get(cls, ()))
    if cls == "BatchNormalization":
        if not cfg.get("scale", True):
            names.remove("gamma")
        if not cfg.get("center", True):
            names.remove("beta")
    elif not cfg.get("use_bias", True) and "bias" in names:
        names.remove("bias")
    return names


def _zip_members(archive: zipfile.ZipFile, path: Path) -> dict[str, zipfile.ZipInfo]:
    """The members of a ``.keras`` archive by name, once their unpacked sizes are within the
    limit (zip reading stops at the declared size) and no name occurs twice."""
    members: dict[str, zipfile.ZipInfo] = {}
    for info in archive.infolist():
        if info.filename in members:
            raise ModelError(f"{path}: refused: the archive holds two members named {info.filename!r}")
        members[info.filename] = info
    MODEL_BYTES.check(sum(i.file_size for i in members.values()), f"{path}: the archive's unpacked members", ModelError)
    return members


def _load_keras_zip(p: Path) -> ConvertedModel:
    """Convert a Keras 3 native ``.keras`` archive (config.json + model.weights.h5)."""
    import h5py

    with zipfile.ZipFile(p) as archive:
        members = _zip_members(archive, p)
        missing = [name for name in ("config.json", "model.weights.h5") if name not in members]
        if missing:
            raise ModelError(f"{p}: not a Keras .keras model (the archive has no {missing[0]})")
        config = _parse_config(archive.read("config.json"))
        weights_blob = archive.read("model.weights.h5")
    check_global_heaps(weights_blob, p)
    with h5py.File(io.BytesIO(weights_blob), "r") as f:
        check_self_contained(f, p)
        datasets = _zip_layer_datasets(f, config)
        budget = weights_budget(p)

        def read(layer: str, cls: str) -> dict[str, np.ndarray]:
            return {short: _read_weight(ds, f"{layer}/{short}", budget) for short, ds in datasets(layer, cls).items()}

        return convert_config(config, read, p)


def _zip_layer_datasets(f: Any, config: dict[str, Any]) -> Callable[[str, str], dict[str, Any]]:
    """(layer name, layer class) -> the layer's weight datasets by short name, in the weights
    file of a ``.keras`` archive (``layers/<stored name>/vars/<i>``)."""
    layers_group = f["layers"] if "layers" in f else f
    stored = _stored_names(config)
    configs = _layer_configs(config)

    def datasets(layer: str, cls: str) -> dict[str, Any]:
        group_name = stored.get(layer, layer)
        if group_name not in layers_group or "vars" not in layers_group[group_name]:
            return {}
        variables = layers_group[group_name]["vars"]
        found = [variables[str(i)] for i in range(len(variables))]
        return dict(zip(_variable_names(cls, configs.get(layer, {})), found, strict=False))

    return datasets


_STORED_PREFIX = {"Conv2D": "conv2d", "Dense": "dense", "BatchNormalization": "batch_normalization"}


def _stored_names(config: dict[str, Any]) -> dict[str, str]:
    """Layer name -> group name in a ``.keras`` weights file.

    Keras 3 stores layers under generic names (``conv2d``, ``conv2d_1``, … counted per class in
    layer order), not under the layers' own names.
    """
    counts: dict[str, int] = {}
    out: dict[str, str] = {}
    for name, cls in _layer_classes(config):
        prefix = _STORED_PREFIX.get(cls)
        if prefix is None:
            continue
        n = counts.get(cls, 0)
        counts[cls] = n + 1
        out[name] = prefix if n == 0 else f"{prefix}_{n}"
    return out


def _layer_classes(config: dict[str, Any]) -> list[tuple[str, str]]:
    layers = _layers_of(config)
    return [(layer.get("config", {}).get("name", layer.get("name")), _layer_class(layer)) for layer in layers]


def _layer_configs(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    layers = _layers_of(config)
    return {layer.get("config", {}).get("name", layer.get("name")): layer.get("config", {}) for layer in layers}


# -- configuration ---------------------------------------------------------------------------
def convert_config(config: dict[str, Any], read_weights: WeightReader, path: Path) -> ConvertedModel:
    """Build the PyTorch network described by a Keras model config (``model.to_json()`` form)."""
    if not isinstance(config, dict):
        raise ModelError(f"{path}: the model config is a JSON {type(config).__name__}, not an object")
    kind = config.get("class_name")
    inner = config.get("config")
    try:
        if kind == "Sequential":
            layers = _layers_of(config)
            converted = _convert_sequential(layers, read_weights, inner if isinstance(inner, dict) else {})
        elif kind in ("Functional", "Model"):
            if not isinstance(inner, dict):
                raise _Unsupported("the Functional model's config is not a JSON object")
            _layers_of(config)
            converted = _convert_functional(inner, read_weights)
        else:
            raise ModelError(
                f"{path}: unsupported Keras model class {str(kind)[:80]!r}; deepdot reads Sequential and "
                "Functional models"
            )
    except _Unsupported as exc:
        raise ModelError(f"{path}: {exc}") from exc
    check_input_shape(path, converted.input_shape)
    return converted


def _layers_of(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The layer entries of a model config, checked to be JSON objects with object configs."""
    inner = config.get("config")
    layers = inner if isinstance(inner, list) else inner.get("layers", []) if isinstance(inner, dict) else None
    if not isinstance(layers, list):
        raise _Unsupported("the model config has no list of layers")
    for layer in layers:
        if not isinstance(layer, dict) or not isinstance(layer.get("config", {}), dict):
            raise _Unsupported(f"the model config lists a layer that is not a JSON object: {str(layer)[:80]!r}")
    return layers


def _input_shape(shape: list[Any] | None, channels_first: bool) -> tuple[int, ...] | None:
    """Keras batch shape (None, H, W, C) -> deepdot's (C, H, W)."""
    if not shape:
        return None
    dims = tuple(shape[1:])
    if len(dims) != 3 or any(d is None for d in dims):
        raise _Unsupported(
            f"the model takes input of shape {list(dims)}; "
            "deepdot needs images of a fixed size (height, width, channels)"
        )
    return tuple(int(d) for d in dims) if channels_first else (int(dims[2]), int(dims[0]), int(dims[1]))


def _layer_class(layer: dict[str, Any]) -> str:
    cls = str(layer.get("class_name"))
    return _ALIASES.get(cls, cls)


def _channels_first(layers: list[dict[str, Any]]) -> bool:
    formats = {layer.get("config", {}).get("data_format") for layer in layers} - {None}
    if len(formats) > 1:
        raise _Unsupported("the model mixes channels_first and channels_last layers")
    return formats == {"channels_first"}


def _convert_sequential(
    layers: list[dict[str, Any]], read_weights: WeightReader, inner: dict[str, Any]
) -> ConvertedModel:
    channels_first = _channels_first(layers)
    shape = None
    for layer in layers:
        cfg = layer.get("config", {})
        shape = shape or cfg.get("batch_shape") or cfg.get("batch_input_shape")
    input_shape = _input_shape(shape or inner.get("build_input_shape"), channels_first)
    body = [layer for layer in layers if _layer_class(layer) != "InputLayer"]
    output_kind, body, strip_last = _strip_final_softmax(body)
    modules: OrderedDict[str, nn.Module] = OrderedDict()
    layer_modules: dict[str, str] = {}
    rank = 4
    for i, layer in enumerate(body):
        cls, cfg = _layer_class(layer), dict(layer.get("config", {}))
        if strip_last and i == len(body) - 1:
            cfg["activation"] = "linear"
        name = module_name(str(cfg.get("name", cls.lower())), modules)
        modules[name], rank = _convert_layer(cls, cfg, read_weights(cfg.get("name", ""), cls), [rank], channels_first)
        if cfg.get("name"):
            layer_modules[str(cfg["name"])] = name
    names = list(modules)
    classes = [_layer_class(layer) for layer in body]
    last_conv, penultimate = _guess_named_layers(names, classes)
    return ConvertedModel(
        network=nn.Sequential(modules),
        input_shape=input_shape,
        output_kind=output_kind,
        softmax_removed=output_kind == "probabilities",
        last_conv_layer=last_conv,
        penultimate_layer=penultimate,
        layer_modules=layer_modules,
    )


def _is_softmax(layer: dict[str, Any]) -> bool:
    cls, cfg = _layer_class(layer), layer.get("config", {})
    return cls == "Softmax" or (cls in ("Activation", "Dense", "Conv2D") and cfg.get("activation") == "softmax")


def _strip_final_softmax(body: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]], bool]:
    """(output kind, layers, whether the last layer's fused softmax must be dropped)."""
    if not body or not _is_softmax(body[-1]):
        return "logits", body, False
    if _layer_class(body[-1]) in ("Softmax", "Activation"):
        return "probabilities", body[:-1], False
    return "probabilities", body, True


def _guess_named_layers(names: list[str], classes: list[str]) -> tuple[str | None, str | None]:
    """(last conv layer, layer feeding the last dense layer) of a chain of Keras layers."""
    last_conv = None
    for i, cls in enumerate(classes):
        if cls == "Conv2D":
            last_conv = names[i]
            if i + 1 < len(classes) and classes[i + 1] in ("Activation", "ReLU", "LeakyReLU", "BatchNormalization"):
                last_conv = names[i + 1]
    dense = [i for i, cls in enumerate(classes) if cls == "Dense"]
    penultimate = names[dense[-1] - 1] if dense and dense[-1] > 0 else None
    return last_conv, penultimate


def _inbound(layer: dict[str, Any]) -> list[str]:
    """Names of the layers feeding ``layer`` (Keras 2 and Keras 3 config forms)."""
    nodes = layer.get("inbound_nodes") or []
    if len(nodes) > 1:
        raise _Unsupported(f"layer {layer.get('name')!r} is called more than once (shared layers are not supported)")
    if not nodes:
        return []
    node = nodes[0]
    if isinstance(node, dict):  # Keras 3: {"args": [...keras tensors...], "kwargs": {...}}
        return [history[0] for history in _keras_histories(node.get("args", []))]
    return [str(entry[0]) for entry in node]  # Keras 2: [["layer", node, tensor, {kwargs}], ...]


def _keras_histories(value: Any) -> Iterator[list[Any]]:
    if isinstance(value, dict):
        if value.get("class_name") == "__keras_tensor__":
            yield value["config"]["keras_history"]
        return
    if isinstance(value, list):
        for item in value:
            yield from _keras_histories(item)


def _endpoint(spec: Any, what: str) -> str:
    """The single layer name in ``input_layers``/``output_layers``."""
    if spec and isinstance(spec[0], str):
        spec = [spec]
    if not spec or len(spec) != 1:
        raise _Unsupported(f"the model has {len(spec or [])} {what}s; deepdot needs exactly one")
    return str(spec[0][0])


def _convert_functional(inner: dict[str, Any], read_weights: WeightReader) -> ConvertedModel:
    layers = inner.get("layers", [])
    by_name = {str(layer.get("name", layer.get("config", {}).get("name"))): layer for layer in layers}
    channels_first = _channels_first(layers)
    input_layer = _endpoint(inner.get("input_layers"), "input")
    output_layer = _endpoint(inner.get("output_layers"), "output")
    if input_layer not in by_name or output_layer not in by_name:
        raise _Unsupported("the model's input or output layer is missing from its config")
    in_cfg = by_name[input_layer].get("config", {})
    input_shape = _input_shape(in_cfg.get("batch_shape") or in_cfg.get("batch_input_shape"), channels_first)

    output_kind, strip_activation = "logits", False
    final = by_name[output_layer]
    if _is_softmax(final):
        output_kind = "probabilities"
        if _layer_class(final) in ("Softmax", "Activation"):
            (output_layer,) = _inbound(final)
        else:
            strip_activation = True

    # Only the layers the output depends on, in an order where inputs come first.
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting or name not in by_name:
            raise _Unsupported(f"layer {name!r} is missing from the config or part of a cycle")
        visiting.add(name)
        for source in _inbound(by_name[name]):
            visit(source)
        order.append(name)

    visit(output_layer)
    names: dict[str, str] = {}
    modules: dict[str, nn.Module] = {}
    ranks: dict[str, int] = {input_layer: 4}
    steps: list[Step] = []
    classes: dict[str, str] = {}
    for keras_name in order:
        layer = by_name[keras_name]
        cls, cfg = _layer_class(layer), dict(layer.get("config", {}))
        if cls == "InputLayer":
            if keras_name != input_layer:
                raise _Unsupported(f"the model has more than one input ({keras_name!r})")
            continue
        if strip_activation and keras_name == output_layer:
            cfg["activation"] = "linear"
        sources = _inbound(layer)
        name = module_name(keras_name, modules)
        names[keras_name] = name
        classes[keras_name] = cls
        modules[name], ranks[keras_name] = _convert_layer(
            cls, cfg, read_weights(keras_name, cls), [ranks[s] for s in sources], channels_first
        )
        steps.append(Step(name, tuple(sources), keras_name))

    conv = [k for k in order if classes.get(k) == "Conv2D"]
    dense = [k for k in order if classes.get(k) == "Dense"]
    feeding = _inbound(by_name[dense[-1]]) if dense else []
    return ConvertedModel(
        network=GraphNetwork(input_layer, steps, output_layer, modules),
        input_shape=input_shape,
        output_kind=output_kind,
        softmax_removed=output_kind == "probabilities",
        last_conv_layer=names[conv[-1]] if conv else None,
        penultimate_layer=names.get(feeding[0]) if len(feeding) == 1 else None,
        layer_modules=names,
    )


# -- layers ----------------------------------------------------------------------------------
def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    a, b = value
    return int(a), int(b)


def _activation(name: str | None) -> nn.Module | None:
    if name in (None, "linear"):
        return None
    table: dict[str, Callable[[], nn.Module]] = {
        "relu": nn.ReLU,
        "relu6": nn.ReLU6,
        "sigmoid": nn.Sigmoid,
        "tanh": nn.Tanh,
        "elu": nn.ELU,
        "selu": nn.SELU,
        "softplus": nn.Softplus,
        "swish": nn.SiLU,
        "silu": nn.SiLU,
        "softmax": lambda: nn.Softmax(dim=1),
    }
    if not isinstance(name, str) or name not in table:
        raise _Unsupported(f"unsupported activation {str(name)[:80]!r}; supported: linear, {', '.join(table)}")
    return table[name]()


def _need(
    weights: dict[str, np.ndarray], key: str, layer: str, shape: tuple[int | None, ...] | None = None
) -> torch.Tensor:
    """The weight ``key`` of ``layer``; with ``shape``, it must have that shape (None: any size)."""
    if key not in weights:
        raise _Unsupported(f"layer {layer!r} has no {key!r} weight in the file")
    value = torch.from_numpy(np.ascontiguousarray(weights[key]))
    if shape is not None and (
        value.dim() != len(shape)
        or any(want is not None and got != want for got, want in zip(value.shape, shape, strict=True))
    ):
        expected = "×".join("N" if d is None else str(d) for d in shape) or "a scalar"
        raise _Unsupported(f"layer {layer!r} stores {key!r} with shape {tuple(value.shape)}, expected {expected}")
    return value


def _convert_layer(
    cls: str, cfg: dict[str, Any], weights: dict[str, np.ndarray], ranks: list[int], channels_first: bool = False
) -> tuple[nn.Module, int]:
    """One Keras layer as a PyTorch module working on N×C×H×W tensors, and its output rank.

    ``ranks`` are the ranks (2 or 4) of the layer's inputs.
    """
    name = str(cfg.get("name", cls))
    rank = ranks[0] if ranks else 4
    if cls not in SUPPORTED_LAYERS:
        raise _Unsupported(
            f"unsupported Keras layer type {cls!r} (layer {name!r}); supported: {', '.join(SUPPORTED_LAYERS)}"
        )
    if len(ranks) > 1 and cls not in ("Add", "Concatenate"):
        raise _Unsupported(f"layer {name!r} ({cls}) has {len(ranks)} inputs")
    if cls == "Conv2D":
        return _conv2d(cfg, weights, name), 4
    if cls == "Dense":
        if rank != 2:
            raise _Unsupported(f"Dense layer {name!r} is applied to an image-shaped tensor; add a Flatten before it")
        kernel = _need(weights, "kernel", name, (None, None))
        dense = nn.Linear(kernel.shape[0], kernel.shape[1], bias=bool(cfg.get("use_bias", True)))
        with torch.no_grad():
            dense.weight.copy_(kernel.T)
            if dense.bias is not None:
                dense.bias.copy_(_need(weights, "bias", name, (kernel.shape[1],)))
        return chain(("dense", dense), ("activation", _activation(cfg.get("activation")))), 2
    if cls in ("MaxPooling2D", "AveragePooling2D"):
        pool_size = _pair(cfg.get("pool_size", 2))
        stride = _pair(cfg.get("strides") or pool_size)
        same = cfg.get("padding", "valid") == "same"
        if cls == "MaxPooling2D":
            pad = SamePad2d(pool_size, stride, value=float("-inf")) if same else None
            return chain(("pad", pad), ("pool", nn.MaxPool2d(pool_size, stride))), 4
        return (SameAvgPool2d(pool_size, stride) if same else nn.AvgPool2d(pool_size, stride)), 4
    if cls in ("GlobalAveragePooling2D", "GlobalMaxPooling2D"):
        pool: nn.Module = nn.AdaptiveAvgPool2d(1) if cls == "GlobalAveragePooling2D" else nn.AdaptiveMaxPool2d(1)
        if cfg.get("keepdims"):
            return pool, 4
        return nn.Sequential(OrderedDict(pool=pool, flatten=nn.Flatten())), 2
    if cls == "BatchNormalization":
        axis = cfg.get("axis", -1)
        axis = axis[0] if isinstance(axis, list) and len(axis) == 1 else axis
        channel_axes = {1} if channels_first else {-1, rank - 1}
        if axis not in channel_axes:
            raise _Unsupported(
                f"BatchNormalization {name!r} normalises axis {axis}; only the channel axis is supported"
            )
        mean = _need(weights, "moving_mean", name, (None,))
        size = (len(mean),)
        gamma = _need(weights, "gamma", name, size) if "gamma" in weights else torch.ones(size)
        beta = _need(weights, "beta", name, size) if "beta" in weights else torch.zeros(size)
        variance = _need(weights, "moving_variance", name, size)
        return batch_norm(gamma, beta, mean, variance, float(cfg.get("epsilon", 1e-3))), rank
    if cls in _IDENTITY_LAYERS:
        return nn.Identity(), rank
    if cls == "Flatten":
        if cfg.get("data_format") == "channels_first":
            return nn.Flatten(), 2
        return ChannelsLastFlatten(), 2
    if cls == "Activation":
        return _activation(cfg.get("activation")) or nn.Identity(), rank
    if cls == "Softmax":
        return nn.Softmax(dim=1), rank
    if cls == "ReLU":
        if float(cfg.get("threshold") or 0.0) != 0.0:
            raise _Unsupported(f"ReLU {name!r} has a non-zero threshold")
        slope = float(cfg.get("negative_slope") or 0.0)
        base: nn.Module = nn.LeakyReLU(slope) if slope else nn.ReLU()
        if cfg.get("max_value") is not None:
            return chain(("relu", base), ("clip", nn.Hardtanh(float("-inf"), float(cfg["max_value"])))), rank
        return base, rank
    if cls == "LeakyReLU":
        return nn.LeakyReLU(float(cfg.get("negative_slope", cfg.get("alpha", 0.3)))), rank
    if cls == "ZeroPadding2D":
        padding = cfg.get("padding", 1)
        if isinstance(padding, int):
            top = bottom = left = right = padding
        elif isinstance(padding[0], int):
            (top, left), (bottom, right) = padding, padding
        else:
            (top, bottom), (left, right) = padding
        _check_padding((top, bottom, left, right), name)
        return nn.ZeroPad2d((left, right, top, bottom)), 4
    if cls == "Add":
        return Add(), rank
    # Concatenate: Keras' channel axis -1 is dimension 1 of a channels-first tensor.
    axis = int(cfg.get("axis", -1))
    if axis not in (-1, rank - 1):
        raise _Unsupported(f"Concatenate {name!r} joins along axis {axis}; only the channel axis is supported")
    return Concat(1), rank


def _conv2d(cfg: dict[str, Any], weights: dict[str, np.ndarray], name: str) -> nn.Module:
    kernel = _need(weights, "kernel", name)  # (kh, kw, in/groups, out)
    if kernel.dim() != 4:
        raise _Unsupported(f"Conv2D {name!r} has a kernel of shape {tuple(kernel.shape)}")
    kh, kw, cin_per_group, cout = kernel.shape
    groups = int(cfg.get("groups", 1))
    stride, dilation = _pair(cfg.get("strides", 1)), _pair(cfg.get("dilation_rate", 1))
    padding_mode = cfg.get("padding", "valid")
    if padding_mode not in ("valid", "same"):
        raise _Unsupported(f"Conv2D {name!r} uses padding {padding_mode!r}")
    pad: nn.Module | None = None
    padding: tuple[int, int] = (0, 0)
    if padding_mode == "same":
        symmetric = stride == (1, 1) and (kh - 1) * dilation[0] % 2 == 0 and (kw - 1) * dilation[1] % 2 == 0
        if symmetric:
            padding = ((kh - 1) * dilation[0] // 2, (kw - 1) * dilation[1] // 2)
            _check_padding(padding, name)
        else:
            pad = SamePad2d((kh, kw), stride, dilation)
    conv = nn.Conv2d(
        cin_per_group * groups,
        cout,
        (kh, kw),
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=bool(cfg.get("use_bias", True)),
    )
    with torch.no_grad():
        conv.weight.copy_(kernel.permute(3, 2, 0, 1))
        if conv.bias is not None:
            conv.bias.copy_(_need(weights, "bias", name, (cout,)))
    return chain(("pad", pad), ("conv", conv), ("activation", _activation(cfg.get("activation"))))


def _check_padding(values: tuple[int, ...], name: str) -> None:
    try:
        check_padding(values, f"layer {name!r}")
    except ValueError as exc:
        raise _Unsupported(str(exc)) from None


# -- writing weights back --------------------------------------------------------------------
def write_keras_weights(network: nn.Module, source: str | Path, dest: str | Path) -> Path:
    """Write ``network``'s weights into a copy of the Keras file ``source`` it was converted from.

    ``network`` must have the structure :func:`load_keras` builds from ``source`` (a repaired
    copy: the mitigations change weights, never layers). The copy keeps everything else of the
    file: its layers, their names, the final softmax, the Keras version it was written with.
    Works for HDF5 and ``.keras`` files alike (no Keras needed). Returns ``dest``.

    Raises:
        ModelError: ``source`` is unreadable, ``network`` does not match it, a weight has no
            place in the file (e.g. a BatchNormalization without ``scale``), or ``dest`` cannot
            be written.
    """
    src, out = Path(source), Path(dest)
    converted = load_keras(src)
    expected = {k: tuple(v.shape) for k, v in converted.network.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in network.state_dict().items()}
    if expected != got:
        raise ModelError(f"{src}: the network to write no longer has this Keras model's layers and weight shapes")
    values = _keras_values(network, converted.layer_modules, src)
    try:
        with replacing(out) as tmp:
            if zipfile.is_zipfile(src):
                _patch_keras_zip(src, tmp, values)
            else:
                import h5py

                shutil.copyfile(src, tmp)
                with h5py.File(tmp, "r+") as f:
                    root = f["model_weights"] if "model_weights" in f else f
                    for layer, arrays in values.items():
                        _assign(src, layer, _h5_layer_datasets(root, layer), arrays)
    except OSError as exc:
        raise ModelError(f"{out}: cannot write the model there ({exc.strerror or exc})") from exc
    return out


def _keras_values(network: nn.Module, layer_modules: dict[str, str], path: Path) -> dict[str, dict[str, np.ndarray]]:
    """Each Keras layer's weights, in Keras layout, read off the PyTorch modules holding them.

    Inverse of :func:`_convert_layer`: conv kernels go back to H×W×in×out, dense kernels to
    in×out; batch norm gives gamma, beta and its moving statistics.
    """
    modules = dict(network.named_modules())
    weighted = (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)
    covered: set[int] = set()
    values: dict[str, dict[str, np.ndarray]] = {}
    for layer, name in layer_modules.items():
        leaves = [m for m in modules[name].modules() if isinstance(m, weighted)]
        if not leaves:
            continue
        if len(leaves) > 1:
            raise ModelError(
                f"{path}: Keras layer {layer!r} became {len(leaves)} weighted modules; cannot write it back"
            )
        leaf = leaves[0]
        covered.add(id(leaf))
        arrays: dict[str, torch.Tensor | None]
        if isinstance(leaf, nn.Conv2d):
            arrays = {"kernel": leaf.weight.permute(2, 3, 1, 0), "bias": leaf.bias}  # O,I,H,W -> H,W,I,O
        elif isinstance(leaf, nn.Linear):
            arrays = {"kernel": leaf.weight.T, "bias": leaf.bias}
        else:
            arrays = {
                "gamma": leaf.weight,
                "beta": leaf.bias,
                "moving_mean": leaf.running_mean,
                "moving_variance": leaf.running_var,
            }
        values[layer] = {k: v.detach().cpu().numpy() for k, v in arrays.items() if v is not None}
    stray = [n for n, m in modules.items() if isinstance(m, weighted) and id(m) not in covered]
    if stray:
        raise ModelError(
            f"{path}: module {stray[0]!r} holds weights that belong to no Keras layer; cannot write it back"
        )
    return values


def _assign(path: Path, layer: str, datasets: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """Overwrite a layer's datasets in place with ``arrays`` (same shapes, the file's dtype)."""
    for key, array in arrays.items():
        if key not in datasets:
            raise ModelError(
                f"{path}: layer {layer!r} stores no {key!r} weight, so its repaired value cannot be written "
                "back to a Keras file"
            )
        dataset = datasets[key]
        if tuple(dataset.shape) != array.shape:
            raise ModelError(
                f"{path}: layer {layer!r} stores {key!r} as {tuple(dataset.shape)}, the network has {array.shape}"
            )
        dataset[...] = array.astype(dataset.dtype)


def _patch_keras_zip(src: Path, dest: Path, values: dict[str, dict[str, np.ndarray]]) -> None:
    """Copy a ``.keras`` archive to ``dest`` with new weights in its ``model.weights.h5``."""
    import h5py

    with zipfile.ZipFile(src) as archive:
        _zip_members(archive, src)
        entries = [(info, archive.read(info.filename)) for info in archive.infolist()]
    files = {info.filename: data for info, data in entries}
    config = _parse_config(files["config.json"])
    classes = dict(_layer_classes(config))
    buffer = io.BytesIO(files["model.weights.h5"])
    with h5py.File(buffer, "r+") as f:
        datasets = _zip_layer_datasets(f, config)
        for layer, arrays in values.items():
            _assign(src, layer, datasets(layer, classes.get(layer, "")), arrays)
    with zipfile.ZipFile(dest, "w") as archive:
        for info, data in entries:
            archive.writestr(info, buffer.getvalue() if info.filename == "model.weights.h5" else data)
