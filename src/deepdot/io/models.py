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
from pathlib import Path
from typing import Any

import torch

from deepdot.errors import ModelError
from deepdot.io.files import replacing
from deepdot.io.foreign import check_finite, read_json_object, sidecar, wrap_network
from deepdot.io.torch_files import from_state_dict, load_torch
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
        meta = sidecar(p)
        if suffix in KERAS_SUFFIXES or suffix in ONNX_SUFFIXES:
            if suffix in KERAS_SUFFIXES:
                from deepdot.io.keras_h5 import load_keras

                converted = load_keras(p)
            else:
                from deepdot.io.onnx_import import load_onnx

                converted = load_onnx(p)
            classifier = wrap_network(
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
            classifier = load_torch(p, meta, preprocess, arch, allow_code or allow_pickle, input_shape)
        else:
            known = ", ".join((".safetensors", *KERAS_SUFFIXES, *ONNX_SUFFIXES, *TORCH_SUFFIXES))
            raise ModelError(f"{p}: unsupported model format {p.suffix!r}; deepdot reads {known} and folders")
    check_finite(classifier.network, p)
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
