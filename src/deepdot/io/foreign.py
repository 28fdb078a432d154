"""Turning a network read from another format into a :class:`~deepdot.models.Classifier`:
what the file records beside its weights (sidecar JSON, embedded metadata), the preprocessing and
input shape to use, one probe pass that reads off the classes, and short error descriptions.
Shared by every reader and writer of the format table, :mod:`deepdot.io.formats`; writing a
model file of another format with its sidecar beside it is :func:`write_with_sidecar`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepdot.errors import DeepdotError, ModelError
from deepdot.io.convert import check_input_shape
from deepdot.io.files import replacing
from deepdot.io.limits import MODEL_BYTES
from deepdot.models import Classifier, Preprocess, PreprocessSpec


def mismatch(exc: BaseException) -> str:
    """The first concrete complaint of ``load_state_dict`` (its first line is only a header)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if isinstance(exc, RuntimeError) and len(lines) > 1:
        return lines[1].split(". ")[0][:200]
    return first_line(exc)


def first_line(exc: BaseException) -> str:
    """A short description of a low-level error: its first sentence, with its type if terse."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = text.split(". ")[0][:160]
    return text if len(text) >= 20 else f"{type(exc).__name__}: {text}".rstrip(": ")


def sidecar(path: Path) -> dict[str, Any]:
    """``<stem>.json`` beside a model file: what the file itself does not record."""
    side = path.with_suffix(".json")
    return read_json_object(side) if side.is_file() else {}


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object from a metadata file (``model.json``, a sidecar), or one line saying why not."""
    try:
        MODEL_BYTES.check(path.stat().st_size, f"{path}: the metadata", ModelError)
        meta = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON or not UTF-8
        raise ModelError(f"{path}: not valid JSON ({first_line(exc)})") from exc
    if not isinstance(meta, dict):
        raise ModelError(f"{path}: expected a JSON object with preprocess / input_shape / architecture")
    return meta


def preprocess_for(
    path: Path, given: PreprocessSpec | None, meta: Mapping[str, Any], default: PreprocessSpec
) -> Preprocess:
    """The preprocessing to use: the caller's, else the model's own record
    (:meth:`Preprocess.from_json <deepdot.models.Preprocess.from_json>`), else ``default``.

    Raises:
        ModelError: the record is no valid preprocessing (the message names ``path``).
    """
    if given is not None:
        return Preprocess.parse(given)
    recorded = meta.get("preprocess")
    if recorded is None:
        return Preprocess.parse(default)
    try:
        return Preprocess.from_json(recorded)
    except ModelError as exc:
        raise ModelError(f"{path}: {exc}") from exc


def recorded_shape(path: Path, meta: Mapping[str, Any]) -> tuple[int, int, int] | None:
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


def wrap_network(
    path: Path,
    network: nn.Module,
    *,
    metadata: Mapping[str, Any],
    preprocess: PreprocessSpec | None,
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
    shape = explicit or recorded_shape(path, metadata) or file_shape
    if shape is None:
        raise ModelError(
            f"{path}: the file does not record its input shape; write it beside the model as "
            f'{path.with_suffix(".json").name} containing {{"input_shape": [channels, height, width]}}'
        )
    spec = preprocess_for(path, preprocess, metadata, "unit")
    check_input_shape(path, shape)
    network = network.eval()
    probe = torch.rand(2, *shape)
    try:
        with torch.no_grad():
            out = network(spec(probe))
    except Exception as exc:  # noqa: BLE001 - a foreign network can fail in any way on the wrong input
        if isinstance(exc, MemoryError):
            raise ModelError(f"{path}: the network needs more memory than there is for one small batch") from exc
        raise ModelError(
            f"{path}: the network does not run on {'x'.join(map(str, shape))} input ({first_line(exc)})"
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


def check_finite(network: nn.Module, path: Path) -> None:
    """Refuse weights holding NaN or Inf (they make every prediction meaningless)."""
    for name, tensor in network.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ModelError(f"{path}: weight {name} contains NaN or Inf")


def sidecar_record(classifier: Classifier) -> dict[str, Any]:
    """What a sidecar (``<stem>.json``) beside a written model file records: its input shape and
    preprocessing, so that the file loads back without ``--preprocess``."""
    return {"input_shape": list(classifier.input_shape), "preprocess": classifier.preprocess.to_json()}


def write_with_sidecar(path: Path, title: str, write: Callable[[Path], None], meta: Mapping[str, Any]) -> list[Path]:
    """Write a model file of another format than deepdot's own, and ``meta`` beside it.

    ``write(path)`` writes the model file (through :func:`~deepdot.io.files.replacing`, so a
    failure leaves nothing half-written); then ``meta`` goes to ``<stem>.json`` (the sidecar
    :func:`sidecar` reads). The folder is created if needed. Returns ``[path, sidecar]``.

    Raises:
        ModelError: one line naming ``path``: it cannot be written there, or the model cannot be
            written as ``title`` (the format's name, e.g. ``"ONNX"``).
    """
    side = path.with_suffix(".json")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path)
        with replacing(side) as tmp:
            tmp.write_text(json.dumps(meta, indent=2) + "\n")
    except DeepdotError:
        raise
    except OSError as exc:
        raise ModelError(f"{path}: cannot write the model there ({exc.strerror or exc})") from exc
    except Exception as exc:  # noqa: BLE001 - torch.onnx / torch.jit raise many types; report one line
        raise ModelError(f"{path}: cannot write the model as {title} ({first_line(exc)})") from exc
    return [path, side]
