"""The model formats deepdot reads and writes: one :class:`ModelFormat` record each, in one table.

============  ===================================  ==============================================
name          suffixes                             written (``deepdot mitigate``'s output) as
============  ===================================  ==============================================
deepdot       a folder, ``.safetensors``           ``model.safetensors`` + ``model.json``
              (also ``.json`` and no suffix)
keras         ``.h5`` ``.hdf5`` ``.keras``         a copy of the input file holding the new weights
onnx          ``.onnx``                            a copy of the input file holding the new weights
torchscript   ``.pt`` ``.pth`` ``.ts``             TorchScript, metadata embedded
              ``.torchscript`` ``.bin``
state_dict    (the same as torchscript)            a ``state_dict`` (read with ``weights_only``)
============  ===================================  ==============================================

Everything that chooses a format consults this table (:data:`MODEL_FORMATS`):
:func:`deepdot.io.models.load_model` reads with ``format_for(path).read``,
:func:`deepdot.io.models.model_file` looks for ``model<suffix>`` of its suffixes, and
:mod:`deepdot.io.save_as` writes with a format's ``write``. To add a format, add a record here.

TorchScript and ``state_dict`` files share their suffixes: the first record whose ``detect``
accepts the file wins. A pickled whole model (readable only with ``allow_code``) is read by the
``state_dict`` record too; :mod:`deepdot.io.save_as` writes it back as TorchScript. Beside a
written file of another format than deepdot's own, ``<stem>.json`` (the sidecar) records what
the file does not (input shape, preprocessing, for a ``state_dict`` the architecture).

deepdot's own format is defined here in full (:func:`model_paths`, :func:`save_model`, its
reader); :mod:`deepdot.io.models` re-exports those names.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from deepdot.errors import ModelError
from deepdot.io.convert import ConvertedModel
from deepdot.io.files import replacing
from deepdot.io.foreign import read_json_object, sidecar, sidecar_record, wrap_network, write_with_sidecar
from deepdot.io.torch_files import (
    from_state_dict,
    is_torchscript,
    read_pickled,
    read_torchscript,
    write_state_dict,
    write_torchscript,
)
from deepdot.models import ARCHITECTURES, Classifier, PreprocessSpec, build_classifier

FORMAT = "deepdot-model"
FORMAT_VERSION = 1


class Reader(Protocol):
    """Reads the model file ``path`` (of the reader's format) as a Classifier.

    ``preprocess`` overrides what the file records; ``arch`` names the architecture of bare
    weights; ``allow_code`` lets a trusted file run its code; ``input_shape`` (C, H, W) is for
    files that do not record it. A reader ignores what its format has no use for.
    """

    def __call__(
        self,
        path: Path,
        *,
        preprocess: PreprocessSpec | None,
        arch: str | None,
        allow_code: bool,
        input_shape: tuple[int, int, int] | None,
    ) -> Classifier: ...


#: ``write(classifier, source, path)`` writes ``classifier`` as the model file ``path`` (and what
#: goes beside it) and returns the paths written, the model file first. ``source`` is the file
#: the classifier was read from: the Keras and ONNX writers copy it with the new weights.
Writer = Callable[[Classifier, Path, Path], list[Path]]


@dataclass(frozen=True)
class ModelFormat:
    """One model format: what it is called, its file suffixes, how to read and write it.

    Attributes:
        name: short identifier (``"onnx"``), the ``kind`` of :class:`deepdot.io.save_as.SaveFormat`.
        title: for messages ("cannot be written as ONNX").
        suffixes: lower-case file suffixes, with the dot; the first is the usual one.
        read: reads a file of this format (see :class:`Reader`).
        write: writes one (see :data:`Writer`), or None where deepdot cannot write the format.
        detect: for formats sharing a suffix, whether the file at a path is of this format
            (None: any file with the suffix is).
    """

    name: str
    title: str
    suffixes: tuple[str, ...]
    read: Reader
    write: Writer | None
    detect: Callable[[Path], bool] | None = None


# -- deepdot's own format ----------------------------------------------------------------------
def model_paths(path: str | Path) -> tuple[Path, Path]:
    """(weights, metadata) paths for a model given as a folder or a ``.safetensors`` file."""
    p = Path(path).expanduser()
    if p.suffix == ".json":
        p = p.with_suffix(".safetensors")
    if p.is_dir() or p.suffix == "":
        return p / "model.safetensors", p / "model.json"
    meta = p.with_suffix(".json")
    if not meta.exists() and (p.parent / "model.json").exists():
        meta = p.parent / "model.json"
    return p, meta


def save_model(classifier: Classifier, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` + ``model.json``; ``path`` is a folder or a ``.safetensors`` file.

    Returns the weights path.
    """
    from safetensors.torch import save_file

    if classifier.architecture is None:
        raise ModelError("only models of a built-in architecture can be saved as safetensors + model.json")
    weights, meta = model_paths(path)
    try:
        weights.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in classifier.network.state_dict().items()}
        with replacing(weights) as tmp:
            save_file(state, str(tmp))
        info = {"format": FORMAT, "version": FORMAT_VERSION, **classifier.describe(), **(extra or {})}
        with replacing(meta) as tmp:
            tmp.write_text(json.dumps(info, indent=2) + "\n")
    except OSError as exc:
        raise ModelError(f"{weights.parent}: cannot write the model there ({exc.strerror or exc})") from exc
    return weights


def _write_deepdot(classifier: Classifier, source: Path, path: Path) -> list[Path]:
    weights = save_model(classifier, path)
    return [weights, weights.with_suffix(".json")]


def _read_deepdot(path: Path, *, preprocess: PreprocessSpec | None, arch: str | None, **_: Any) -> Classifier:
    """safetensors + model.json (or + ``arch`` when there is no model.json)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights, meta_path = model_paths(path)
    if not weights.exists():
        raise ModelError(f"{weights}: no such model file")
    if weights.suffix != ".safetensors":
        raise ModelError(
            f"{weights}: unsupported model format {weights.suffix!r}; deepdot reads .safetensors + model.json"
        )
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"{weights}: corrupt or truncated safetensors file ({exc})") from exc
    if not meta_path.exists():
        if arch is None:
            raise ModelError(
                f"{weights}: no model.json beside it saying which architecture the weights belong to; "
                f"give one with --arch ({', '.join(ARCHITECTURES)})"
            )
        return from_state_dict(weights, state, arch, {}, preprocess)
    meta = read_json_object(meta_path)
    arch = meta.get("architecture")
    if arch not in ARCHITECTURES:
        raise ModelError(f"{meta_path}: unknown architecture {arch!r}; built in: {', '.join(ARCHITECTURES)}")
    kwargs = {k: v for k, v in (meta.get("arch_kwargs") or {}).items()}
    try:
        classifier = build_classifier(
            arch,
            num_classes=int(meta["num_classes"]),
            input_shape=tuple(meta["input_shape"]),
            preprocess=preprocess if preprocess is not None else meta.get("preprocess"),
            **kwargs,
        )
        classifier.network.load_state_dict(state, strict=True)
    except (KeyError, TypeError, RuntimeError) as exc:
        raise ModelError(f"{weights}: weights do not match architecture {arch} ({str(exc).splitlines()[0]})") from exc
    return classifier


# -- Keras and ONNX: converted on reading, written as a copy of the input file ------------------
def _wrap_converted(
    path: Path,
    converted: Callable[[Path], ConvertedModel],
    preprocess: PreprocessSpec | None,
    input_shape: tuple[int, ...] | None,
) -> Classifier:
    """``converted(path)`` (a converter) made a Classifier; the sidecar, read first, overrides
    what the file says about itself."""
    meta = sidecar(path)
    model = converted(path)
    return wrap_network(
        path,
        model.network,
        metadata={**model.metadata, **meta},
        preprocess=preprocess,
        input_shape=input_shape,
        file_shape=model.input_shape,
        output_kind=model.output_kind,
        softmax_removed=model.softmax_removed,
        last_conv_layer=model.last_conv_layer,
        penultimate_layer=model.penultimate_layer,
    )


def _read_keras(path: Path, *, preprocess: PreprocessSpec | None, input_shape: Any, **_: Any) -> Classifier:
    from deepdot.io.keras_h5 import load_keras

    return _wrap_converted(path, load_keras, preprocess, input_shape)


def _read_onnx(path: Path, *, preprocess: PreprocessSpec | None, input_shape: Any, **_: Any) -> Classifier:
    from deepdot.io.onnx_import import load_onnx

    return _wrap_converted(path, load_onnx, preprocess, input_shape)


def _write_keras(classifier: Classifier, source: Path, path: Path) -> list[Path]:
    from deepdot.io.keras_h5 import write_keras_weights

    def write(dest: Path) -> None:
        write_keras_weights(classifier.network, source, dest)

    return write_with_sidecar(path, "Keras", write, sidecar_record(classifier))


def _write_onnx(classifier: Classifier, source: Path, path: Path) -> list[Path]:
    """A copy of the ONNX input file holding the new weights; preprocessing in its metadata too."""
    from deepdot.io.onnx_import import write_onnx_weights

    metadata = {
        "preprocess": classifier.preprocess.to_metadata(),
        "input_shape": json.dumps(list(classifier.input_shape)),
    }

    def write(dest: Path) -> None:
        write_onnx_weights(classifier.network, source, dest, metadata)

    return write_with_sidecar(path, "ONNX", write, sidecar_record(classifier))


# -- the table ---------------------------------------------------------------------------------
_TORCH_SUFFIXES = (".pt", ".pth", ".ts", ".torchscript", ".bin")

DEEPDOT = ModelFormat("deepdot", "safetensors + model.json", (".safetensors",), _read_deepdot, _write_deepdot)
KERAS = ModelFormat("keras", "Keras", (".h5", ".hdf5", ".keras"), _read_keras, _write_keras)
ONNX = ModelFormat("onnx", "ONNX", (".onnx",), _read_onnx, _write_onnx)
TORCHSCRIPT = ModelFormat(
    "torchscript", "TorchScript", _TORCH_SUFFIXES, read_torchscript, write_torchscript, detect=is_torchscript
)
STATE_DICT = ModelFormat("state_dict", "a PyTorch state_dict", _TORCH_SUFFIXES, read_pickled, write_state_dict)

#: Every format deepdot knows, in the order suffixes are listed to users. The functions below read
#: it when called, so it is the one place that decides.
MODEL_FORMATS: tuple[ModelFormat, ...] = (DEEPDOT, KERAS, ONNX, TORCHSCRIPT, STATE_DICT)


def suffixes() -> tuple[str, ...]:
    """Every model file suffix deepdot reads, each once, in table order."""
    return tuple(dict.fromkeys(s for f in MODEL_FORMATS for s in f.suffixes))


def file_suffixes() -> tuple[str, ...]:
    """The suffixes of the single-file formats (all but deepdot's own, a pair of files), each once."""
    return tuple(s for s in suffixes() if s not in DEEPDOT.suffixes)


def writable() -> tuple[ModelFormat, ...]:
    """The formats deepdot can write (those with a ``write``), in table order."""
    return tuple(f for f in MODEL_FORMATS if f.write is not None)


def is_deepdot_path(path: Path) -> bool:
    """Whether ``path`` names deepdot's own format: an existing folder, or by its name alone (the
    path need not exist) no suffix, ``.safetensors`` or the ``.json`` metadata of the pair."""
    return path.is_dir() or path.suffix.lower() in ("", ".json", *DEEPDOT.suffixes)


def find_format(path: str | Path) -> ModelFormat | None:
    """The format of the model at ``path`` (see :func:`format_for`), or None for an unknown suffix."""
    p = Path(path).expanduser()
    if is_deepdot_path(p):
        return DEEPDOT
    suffix = p.suffix.lower()
    for fmt in MODEL_FORMATS:
        if suffix in fmt.suffixes and (fmt.detect is None or fmt.detect(p)):
            return fmt
    return None


def format_for(path: str | Path) -> ModelFormat:
    """The format of the model at ``path``: deepdot's own for a folder, ``.safetensors``, ``.json``
    or no suffix; else the record listing the suffix (where several do, the first whose
    ``detect`` accepts the file, so a ``.pt`` file is ``torchscript`` or ``state_dict`` by content).

    Raises:
        ModelError: no format has the suffix (one line naming the file and the suffixes read).
    """
    fmt = find_format(path)
    if fmt is None:
        p = Path(path).expanduser()
        raise ModelError(
            f"{p}: unsupported model format {p.suffix!r}; deepdot reads {', '.join(suffixes())} and folders"
        )
    return fmt


def format_named(name: str) -> ModelFormat:
    """The format called ``name`` (``"onnx"``…).

    Raises:
        ModelError: there is none of that name.
    """
    for fmt in MODEL_FORMATS:
        if fmt.name == name:
            return fmt
    raise ModelError(f"unknown model format {name!r}; deepdot knows {', '.join(f.name for f in MODEL_FORMATS)}")
