"""PyTorch's own files: TorchScript archives (checked by :mod:`deepdot.io.torchscript` before
anything runs), plain ``state_dict`` files of a built-in architecture (read with the weights-only
unpickler, their unpacked size bounded first) and, only when the user vouches for the file,
pickled whole models.

The readers (:func:`read_torchscript`, :func:`read_pickled`) and writers
(:func:`write_torchscript`, :func:`write_state_dict`) are the ``torchscript`` and ``state_dict``
entries of the format table, :mod:`deepdot.io.formats`; both formats use the same suffixes and
:func:`is_torchscript` tells their files apart.
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
from deepdot.io.files import replacing
from deepdot.io.foreign import (
    first_line,
    mismatch,
    preprocess_for,
    sidecar,
    sidecar_record,
    wrap_network,
    write_with_sidecar,
)
from deepdot.io.limits import MODEL_BYTES
from deepdot.io.torchscript import is_flatbuffer, load_torchscript
from deepdot.models import ARCHITECTURES, Classifier, PreprocessSpec, build_classifier

_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")


def is_torchscript(path: Path) -> bool:
    """A TorchScript archive holds compiled code (``code/...``). Anything that could be loaded as
    TorchScript is treated as such: a zip with code as PyTorch's own archive reader sees it, and
    PyTorch's flatbuffer format (``PTMF`` at offset 4), which the TorchScript reader then refuses."""
    try:
        with open(path, "rb") as f:
            if is_flatbuffer(f.read(8)):
                return True
        reader = torch._C.PyTorchFileReader(str(path))
        return any(name.startswith("code/") for name in reader.get_all_records())
    except Exception:  # noqa: BLE001 - not an archive PyTorch can read: not TorchScript
        return False


def read_torchscript(
    path: Path,
    *,
    preprocess: PreprocessSpec | None = None,
    arch: str | None = None,
    allow_code: bool = False,
    input_shape: tuple[int, int, int] | None = None,
) -> Classifier:
    """A TorchScript archive as a Classifier; its embedded ``model.json`` and the sidecar beside
    it (which wins) say the input shape and preprocessing. ``arch`` is not used (the archive
    holds its own network)."""
    meta = sidecar(path)
    module, embedded = load_torchscript(path, allow_code=allow_code)
    return wrap_network(path, module, metadata={**embedded, **meta}, preprocess=preprocess, input_shape=input_shape)


def read_pickled(
    path: Path,
    *,
    preprocess: PreprocessSpec | None = None,
    arch: str | None = None,
    allow_code: bool = False,
    input_shape: tuple[int, int, int] | None = None,
) -> Classifier:
    """A ``torch.save`` file as a Classifier: a ``state_dict`` of the built-in architecture
    ``arch`` (or the sidecar's ``architecture``), read with ``weights_only=True``; a pickled
    whole model only with ``allow_code`` (unpickling it may run its code)."""
    meta = sidecar(path)
    _check_unpacked_size(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" not in str(exc).lower():
            raise ModelError(f"{path}: corrupt, truncated or not a PyTorch file ({first_line(exc)})") from exc
        if not allow_code:
            raise ModelError(
                f"{path}: refused: the file holds pickled Python objects (such as a whole nn.Module) and "
                "unpickling them can run any code; if you trust the file, pass --allow-code, otherwise "
                "ask for a state_dict, TorchScript, ONNX or safetensors file"
            ) from exc
        obj = _load_trusted_pickle(path)
    except Exception as exc:  # noqa: BLE001 - garbage makes the (code-free) weights-only unpickler fail in many ways
        raise ModelError(f"{path}: corrupt, truncated or not a PyTorch file ({first_line(exc)})") from exc
    if isinstance(obj, nn.Module):
        return wrap_network(path, obj, metadata=meta, preprocess=preprocess, input_shape=input_shape)
    if not isinstance(obj, Mapping):
        raise ModelError(f"{path}: holds a {type(obj).__name__}, not a state_dict or a model")
    return from_state_dict(path, _unwrap_state_dict(path, obj), arch or meta.get("architecture"), meta, preprocess)


def write_torchscript(classifier: Classifier, source: Path, path: Path) -> list[Path]:
    """Write ``classifier`` as a TorchScript archive with its metadata embedded as ``model.json``
    and in the sidecar beside it; a network that is not TorchScript already is scripted, or
    traced where scripting fails. ``source`` is not used. Returns ``[path, sidecar]``."""
    meta = {**sidecar_record(classifier), "output_kind": classifier.output_kind}

    def write(dest: Path) -> None:
        network = classifier.network.eval()
        module: torch.jit.ScriptModule
        if isinstance(network, torch.jit.ScriptModule):
            module = network
        else:
            try:
                module = torch.jit.script(network)
            except Exception:  # noqa: BLE001 - scripting rejects much Python; tracing is the fallback
                example = torch.zeros(1, *classifier.input_shape, device=classifier.device)
                with torch.no_grad():
                    module = torch.jit.trace(network, example)
        with replacing(dest) as tmp:
            torch.jit.save(module, str(tmp), _extra_files={"model.json": json.dumps(meta)})

    return write_with_sidecar(path, "TorchScript", write, meta)


def write_state_dict(classifier: Classifier, source: Path, path: Path) -> list[Path]:
    """Write ``classifier``'s weights as a plain ``state_dict`` (``torch.save``), its architecture
    in the sidecar beside it. ``source`` is not used. Returns ``[path, sidecar]``."""

    def write(dest: Path) -> None:
        state = {k: v.detach().cpu().contiguous() for k, v in classifier.network.state_dict().items()}
        with replacing(dest) as tmp:
            torch.save(state, tmp)

    meta = {"architecture": classifier.architecture, **sidecar_record(classifier)}
    return write_with_sidecar(path, "a PyTorch state_dict", write, meta)


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
        raise ModelError(f"{path}: cannot unpickle the model ({first_line(exc)})") from exc


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


def from_state_dict(
    path: Path,
    state: dict[str, torch.Tensor],
    arch: str | None,
    meta: Mapping[str, Any],
    preprocess: PreprocessSpec | None,
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
            preprocess=preprocess_for(path, preprocess, meta, ARCHITECTURES[arch].preprocess),
        )
        classifier.network.load_state_dict(state, strict=True)
    except (KeyError, IndexError, RuntimeError) as exc:
        raise ModelError(f"{path}: weights do not match architecture {arch} ({mismatch(exc)})") from exc
    return classifier
