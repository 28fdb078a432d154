"""Saving and loading models safely.

deepdot's own format is a pair of files: ``model.safetensors`` (weights only: no code can run
when it is read) and ``model.json`` beside it (architecture, number of classes, input shape,
preprocessing). Models are untrusted input, so nothing here unpickles by default.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from deepdot.errors import ModelError
from deepdot.models import ARCHITECTURES, Classifier, build_classifier

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
        save_file(state, str(weights))
        info = {"format": FORMAT, "version": FORMAT_VERSION, **classifier.describe(), **(extra or {})}
        meta.write_text(json.dumps(info, indent=2) + "\n")
    except OSError as exc:
        raise ModelError(f"{weights.parent}: cannot write the model there ({exc.strerror or exc})") from exc
    return weights


def load_model(
    path: str | Path,
    *,
    preprocess: Any = None,
    device: str | torch.device = "cpu",
    arch: str | None = None,
    allow_pickle: bool = False,
) -> Classifier:
    """Load a model saved by :func:`save_model` (``.safetensors`` path or its folder).

    Args:
        path: the ``.safetensors`` file (``model.json`` or ``<stem>.json`` must lie beside it),
            or the folder holding ``model.safetensors``.
        preprocess: override the preprocessing recorded in the JSON.
        device: where to put the model.
        arch: architecture of a plain ``state_dict`` file (other formats say their own).
        allow_pickle: allow unpickling a full pickled model (runs code from the file: only for
            trusted files). Off by default.

    Raises:
        ModelError: a one-line reason (missing/corrupt file, unknown architecture, NaN weights…).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights, meta_path = model_paths(path)
    if not weights.exists():
        raise ModelError(f"{weights}: no such model file")
    if weights.suffix != ".safetensors":
        raise ModelError(f"{weights}: unsupported model format {weights.suffix!r}; deepdot reads .safetensors + model.json")
    if not meta_path.exists():
        raise ModelError(f"{weights}: no model.json beside it saying which architecture the weights belong to")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{meta_path}: not valid JSON ({exc})") from exc
    arch = meta.get("architecture")
    if arch not in ARCHITECTURES:
        raise ModelError(f"{meta_path}: unknown architecture {arch!r}; built in: {', '.join(ARCHITECTURES)}")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"{weights}: corrupt or truncated safetensors file ({exc})") from exc
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
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ModelError(f"{weights}: weight {name} contains NaN or Inf")
    return classifier.to(device).eval()
