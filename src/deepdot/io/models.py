"""Saving and loading models safely.

deepdot's own format is a pair of files: ``model.safetensors`` (weights only: no code can run
when it is read) and ``model.json`` beside it (architecture, number of classes, input shape,
preprocessing). :func:`load_model` also reads the formats people receive models in — Keras
HDF5/``.keras``, ONNX, TorchScript and plain PyTorch ``state_dict`` files — and turns each into
a :class:`~deepdot.models.Classifier`.

Models are untrusted input: nothing here runs code from a file. Keras and ONNX files are
converted layer by layer, ``torch.load`` always runs with ``weights_only=True``, TorchScript
archives run only after their every operator is checked against an allow-list of pure tensor
operations (:mod:`deepdot.io.torchscript`), and a pickled whole ``nn.Module`` (which can run
arbitrary code when unpickled) is refused — unless the caller explicitly passes
``allow_code=True`` for a file it trusts.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepdot.errors import ModelError
from deepdot.io.convert import check_input_shape
from deepdot.io.files import replacing
from deepdot.io.limits import MODEL_BYTES
from deepdot.models import ARCHITECTURES, Classifier, build_classifier
from deepdot.models.classifier import Preprocess

KERAS_SUFFIXES = (".h5", ".hdf5", ".keras")
ONNX_SUFFIXES = (".onnx",)
TORCH_SUFFIXES = (".pt", ".pth", ".ts", ".torchscript", ".bin")

FORMAT = "deepdot-model"
FORMAT_VERSION = 1


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


def model_file(path: str | Path) -> Path:
    """The model :func:`load_model` reads for ``path``.

    A folder without ``model.safetensors`` but with exactly one ``model.<suffix>`` of another
    format (``deepdot mitigate`` writes the repaired model so when the input was, say, ONNX)
    stands for that file; any other path stands for itself.
    """
    p = Path(path).expanduser()
    if p.is_dir() and not (p / "model.safetensors").exists():
        found = [p / f"model{s}" for s in (*KERAS_SUFFIXES, *ONNX_SUFFIXES, *TORCH_SUFFIXES)]
        found = [f for f in found if f.is_file()]
        if len(found) == 1:
            return found[0]
    return p


def model_digest(path: str | Path) -> str:
    """SHA-256 over every file :func:`load_model` reads for ``path`` (the model file, and its
    ``model.json`` or ``<stem>.json`` beside it), so that a result is never reused for other bytes."""
    import hashlib

    p = model_file(path)
    if p.is_dir() or p.suffix.lower() in ("", ".safetensors", ".json"):
        files = list(model_paths(p))
    else:
        files = [p, p.with_suffix(".json")]
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        try:
            with open(f, "rb") as stream:
                for chunk in iter(lambda: stream.read(1 << 20), b""):
                    h.update(chunk)
        except FileNotFoundError:
            h.update(b"(absent)")
        except OSError as exc:
            raise ModelError(f"{f}: cannot read ({exc.strerror or exc})") from exc
        h.update(b"\0")
    return h.hexdigest()


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


def load_model(
    path: str | Path,
    *,
    preprocess: Preprocess | None = None,
    device: str | torch.device = "cpu",
    arch: str | None = None,
    allow_code: bool = False,
    input_shape: tuple[int, int, int] | None = None,
    allow_pickle: bool = False,
) -> Classifier:
    """Load a model file of any supported format as a :class:`Classifier`.

    The format follows the suffix:

    * a folder, ``.safetensors`` or ``.json``: deepdot's own format (:func:`save_model`); a
      ``.safetensors`` file without ``model.json`` needs ``arch``; a folder holding one
      ``model.<suffix>`` of another format instead stands for that file (:func:`model_file`);
    * ``.h5``/``.hdf5``/``.keras``: a Keras full model, converted to PyTorch;
    * ``.onnx``: converted to PyTorch (needs the ``onnx`` package, ``deepdot[formats]``);
    * ``.pt``/``.pth``/``.ts``/``.torchscript``/``.bin``: a TorchScript archive, or a plain
      ``state_dict`` of the built-in architecture ``arch``, read with ``weights_only=True``.

    What a file does not say about itself (input shape, preprocessing) can be given in a JSON
    file beside it, ``<stem>.json``, with keys ``preprocess``, ``input_shape`` ([C, H, W]) and
    ``architecture``; a TorchScript archive may carry the same as an embedded ``model.json``, an
    ONNX file as ``metadata_props``. A model that ends in a softmax is detected: the softmax is
    removed where possible and ``Classifier.output_kind`` says ``"probabilities"``.

    Args:
        path: the model file or folder.
        preprocess: overrides the preprocessing recorded with the model (default ``"unit"`` when
            nothing is recorded; Neural Cleanse's Keras models need ``"raw"``).
        device: where to put the model.
        arch: architecture of a plain ``state_dict`` file (other formats say their own).
        allow_code: allow a file to run its own code: unpickle a full pickled model, and run a
            TorchScript archive without checking its operators (only for trusted files). Off
            by default.
        input_shape: (C, H, W), for files that do not record it (TorchScript, pickled modules).
        allow_pickle: the former name of ``allow_code`` (still accepted).

    Raises:
        ModelError: one line naming the file and the problem (missing, corrupt or truncated,
            unsafe, unsupported layer, NaN or Inf weights, unknown architecture…).
    """
    p = model_file(path)
    suffix = p.suffix.lower()
    if p.is_dir() or suffix in ("", ".safetensors", ".json"):
        classifier = _load_deepdot(p, preprocess, arch)
    else:
        if not p.is_file():
            raise ModelError(f"{p}: no such model file")
        meta = _sidecar(p)
        if suffix in KERAS_SUFFIXES or suffix in ONNX_SUFFIXES:
            if suffix in KERAS_SUFFIXES:
                from deepdot.io.keras_h5 import load_keras

                converted = load_keras(p)
            else:
                from deepdot.io.onnx_import import load_onnx

                converted = load_onnx(p)
            classifier = _wrap(
                p,
                converted.network,
                metadata={**converted.metadata, **meta},
                preprocess=preprocess,
                input_shape=input_shape,
                file_shape=converted.input_shape,
                output_kind=converted.output_kind,
                softmax_removed=converted.softmax_removed,
                last_conv_layer=converted.last_conv_layer,
                penultimate_layer=converted.penultimate_layer,
            )
        elif suffix in TORCH_SUFFIXES:
            classifier = _load_torch(p, meta, preprocess, arch, allow_code or allow_pickle, input_shape)
        else:
            known = ", ".join((".safetensors", *KERAS_SUFFIXES, *ONNX_SUFFIXES, *TORCH_SUFFIXES))
            raise ModelError(f"{p}: unsupported model format {p.suffix!r}; deepdot reads {known} and folders")
    _check_finite(classifier.network, p)
    return classifier.to(device).eval()


# -- deepdot's own format ----------------------------------------------------------------------
def _load_deepdot(path: Path, preprocess: Preprocess | None, arch: str | None) -> Classifier:
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
        return _from_state_dict(weights, state, arch, {}, preprocess)
    meta = _read_json_object(meta_path)
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


# -- PyTorch files -------------------------------------------------------------------------------
_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive holds compiled code (``code/...``). Anything that could be loaded as
    TorchScript is treated as such: a zip with code as PyTorch's own archive reader sees it, and
    PyTorch's flatbuffer format (``PTMF`` at offset 4), which the TorchScript reader then refuses."""
    try:
        with open(path, "rb") as f:
            if f.read(8)[4:8] == b"PTMF":
                return True
        reader = torch._C.PyTorchFileReader(str(path))
        return any(name.startswith("code/") for name in reader.get_all_records())
    except Exception:  # noqa: BLE001 - not an archive PyTorch can read: not TorchScript
        return False


def _load_torch(
    path: Path,
    meta: dict[str, Any],
    preprocess: Preprocess | None,
    arch: str | None,
    allow_code: bool,
    input_shape: tuple[int, int, int] | None,
) -> Classifier:
    """A TorchScript archive, a ``state_dict`` (``weights_only=True``), or — opted in — a pickle."""
    if _is_torchscript(path):
        from deepdot.io.torchscript import load_torchscript

        module, embedded = load_torchscript(path, allow_code=allow_code)
        return _wrap(path, module, metadata={**embedded, **meta}, preprocess=preprocess, input_shape=input_shape)
    _check_unpacked_size(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" not in str(exc).lower():
            raise ModelError(f"{path}: corrupt, truncated or not a PyTorch file ({_first_line(exc)})") from exc
        if not allow_code:
            raise ModelError(
                f"{path}: refused: the file holds pickled Python objects (such as a whole nn.Module) and "
                "unpickling them can run any code; if you trust the file, pass --allow-code, otherwise "
                "ask for a state_dict, TorchScript, ONNX or safetensors file"
            ) from exc
        obj = _load_trusted_pickle(path)
    except Exception as exc:  # noqa: BLE001 - garbage makes the (code-free) weights-only unpickler fail in many ways
        raise ModelError(f"{path}: corrupt, truncated or not a PyTorch file ({_first_line(exc)})") from exc
    if isinstance(obj, nn.Module):
        return _wrap(path, obj, metadata=meta, preprocess=preprocess, input_shape=input_shape)
    if not isinstance(obj, Mapping):
        raise ModelError(f"{path}: holds a {type(obj).__name__}, not a state_dict or a model")
    return _from_state_dict(path, _unwrap_state_dict(path, obj), arch or meta.get("architecture"), meta, preprocess)


def _check_unpacked_size(path: Path) -> None:
    """Bound what ``torch.load`` will unpack: a zip's records may be compressed far below their size."""
    try:
        reader = torch._C.PyTorchFileReader(str(path))
        size = sum(int(reader.get_record_size(name)) for name in reader.get_all_records())
    except Exception:  # noqa: BLE001 - not a zip PyTorch reads: the file is all there is
        size = path.stat().st_size
    MODEL_BYTES.check(size, f"{path}: the file's contents", ModelError)


def _load_trusted_pickle(path: Path) -> Any:
    """Unpickle a file the user has vouched for (``allow_code=True``): this may run its code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError, ImportError) as exc:
        raise ModelError(f"{path}: cannot unpickle the model ({_first_line(exc)})") from exc


def _unwrap_state_dict(path: Path, obj: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of a state_dict, also when saved inside a checkpoint dict or by DataParallel."""
    for key in _STATE_DICT_KEYS:
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    state = {str(k).removeprefix("module."): v for k, v in obj.items()}
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not state or bad:
        what = ", ".join(bad[:3]) or "none at all"
        raise ModelError(f"{path}: not a state_dict (entries that are not tensors: {what})")
    return state


def _from_state_dict(
    path: Path, state: dict[str, torch.Tensor], arch: str | None, meta: dict[str, Any], preprocess: Preprocess | None
) -> Classifier:
    """A built-in architecture holding ``state``; classes and input channels read off the weights."""
    if arch is None:
        raise ModelError(
            f"{path}: a plain state_dict holds only weights; name its architecture with --arch "
            f"({', '.join(ARCHITECTURES)})"
        )
    if arch not in ARCHITECTURES:
        raise ModelError(f"{path}: unknown architecture {arch!r}; built in: {', '.join(ARCHITECTURES)}")
    template = build_classifier(arch).network
    linears = [name for name, m in template.named_modules() if isinstance(m, nn.Linear)]
    convs = [name for name, m in template.named_modules() if isinstance(m, nn.Conv2d)]
    default_shape = ARCHITECTURES[arch].input_shape
    try:
        num_classes = int(state[f"{linears[-1]}.weight"].shape[0])
        channels = int(state[f"{convs[0]}.weight"].shape[1]) if convs else default_shape[0]
        classifier = build_classifier(
            arch,
            num_classes=num_classes,
            input_shape=(channels, *default_shape[1:]),
            preprocess=_preprocess_for(path, preprocess, meta, ARCHITECTURES[arch].preprocess),
        )
        classifier.network.load_state_dict(state, strict=True)
    except (KeyError, IndexError, RuntimeError) as exc:
        raise ModelError(f"{path}: weights do not match architecture {arch} ({_mismatch(exc)})") from exc
    return classifier


# -- shared --------------------------------------------------------------------------------------
def _mismatch(exc: BaseException) -> str:
    """The first concrete complaint of ``load_state_dict`` (its first line is only a header)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if isinstance(exc, RuntimeError) and len(lines) > 1:
        return lines[1].split(". ")[0][:200]
    return _first_line(exc)


def _first_line(exc: BaseException) -> str:
    """A short description of a low-level error: its first sentence, with its type if terse."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = text.split(". ")[0][:160]
    return text if len(text) >= 20 else f"{type(exc).__name__}: {text}".rstrip(": ")


def _sidecar(path: Path) -> dict[str, Any]:
    """``<stem>.json`` beside a model file: what the file itself does not record."""
    side = path.with_suffix(".json")
    return _read_json_object(side) if side.is_file() else {}


def _read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object from a metadata file (``model.json``, a sidecar), or one line saying why not."""
    try:
        MODEL_BYTES.check(path.stat().st_size, f"{path}: the metadata", ModelError)
        meta = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON or not UTF-8
        raise ModelError(f"{path}: not valid JSON ({_first_line(exc)})") from exc
    if not isinstance(meta, dict):
        raise ModelError(f"{path}: expected a JSON object with preprocess / input_shape / architecture")
    return meta


def _preprocess_for(path: Path, given: Preprocess | None, meta: Mapping[str, Any], default: Preprocess) -> Preprocess:
    """The preprocessing to use: the caller's, else the model's own record, else ``default``."""
    from deepdot.models import parse_preprocess

    if given is not None:
        return given
    recorded = meta.get("preprocess")
    if recorded is None:
        return default
    if isinstance(recorded, str) and recorded.strip().startswith("{"):
        try:
            recorded = json.loads(recorded)
        except json.JSONDecodeError as exc:
            raise ModelError(f"{path}: recorded preprocess {recorded!r} is not valid JSON") from exc
    try:
        return parse_preprocess(recorded)
    except ModelError as exc:
        raise ModelError(f"{path}: {exc}") from exc


def _recorded_shape(path: Path, meta: Mapping[str, Any]) -> tuple[int, int, int] | None:
    shape = meta.get("input_shape")
    if shape is None:
        return None
    try:
        if isinstance(shape, str):
            text = shape.strip()
            shape = json.loads(text) if text.startswith("[") else text.replace("x", ",").split(",")
        c, h, w = (int(v) for v in shape)
    except (TypeError, ValueError) as exc:  # ValueError: also bad JSON
        raise ModelError(f"{path}: recorded input_shape {shape!r} is not [channels, height, width]") from exc
    check_input_shape(path, (c, h, w))
    return c, h, w


def _wrap(
    path: Path,
    network: nn.Module,
    *,
    metadata: Mapping[str, Any],
    preprocess: Preprocess | None,
    input_shape: tuple[int, ...] | None,
    file_shape: tuple[int, ...] | None = None,
    output_kind: str | None = None,
    softmax_removed: bool = False,
    last_conv_layer: str | None = None,
    penultimate_layer: str | None = None,
) -> Classifier:
    """A Classifier around a network loaded from a foreign format.

    The input shape is the caller's (``input_shape``), else the one recorded in metadata, else
    the one the format itself declares (``file_shape``).
    The number of classes is read off one forward pass. When the format cannot say whether
    the network ends in a softmax (TorchScript, pickles), that pass decides: outputs that are
    non-negative and sum to 1 are probabilities.
    """
    explicit = tuple(int(v) for v in input_shape) if input_shape else None
    shape = explicit or _recorded_shape(path, metadata) or file_shape
    if shape is None:
        raise ModelError(
            f"{path}: the file does not record its input shape; write it beside the model as "
            f'{path.with_suffix(".json").name} containing {{"input_shape": [channels, height, width]}}'
        )
    spec = _preprocess_for(path, preprocess, metadata, "unit")
    check_input_shape(path, shape)
    network = network.eval()
    probe = torch.rand(2, *shape)
    try:
        with torch.no_grad():
            from deepdot.models.classifier import preprocess_tensor

            out = network(preprocess_tensor(probe, spec))
    except Exception as exc:  # noqa: BLE001 - a foreign network can fail in any way on the wrong input
        if isinstance(exc, MemoryError):
            raise ModelError(f"{path}: the network needs more memory than there is for one small batch") from exc
        raise ModelError(
            f"{path}: the network does not run on {'x'.join(map(str, shape))} input ({_first_line(exc)})"
        ) from exc
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] < 2:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(f"{path}: the network's output is {got}, not one score per class (N x classes)")
    if output_kind is None:
        output_kind = str(metadata.get("output_kind") or "")
        if output_kind not in ("logits", "probabilities"):
            sums_to_one = torch.allclose(out.sum(1), torch.ones(len(out)), atol=1e-4)
            output_kind = "probabilities" if bool((out >= 0).all()) and sums_to_one else "logits"
    return Classifier(
        network,
        input_shape=shape,
        num_classes=int(out.shape[1]),
        preprocess=spec,
        last_conv_layer=last_conv_layer,
        penultimate_layer=penultimate_layer,
        output_kind=output_kind,
        softmax_removed=softmax_removed,
    )


def _check_finite(network: nn.Module, path: Path) -> None:
    """Refuse weights holding NaN or Inf (they make every prediction meaningless)."""
    for name, tensor in network.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ModelError(f"{path}: weight {name} contains NaN or Inf")
