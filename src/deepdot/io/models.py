"""Saving and loading models safely.

deepdot's own format is a pair of files: ``model.safetensors`` (weights only: no code can run
when it is read) and ``model.json`` beside it (architecture, number of classes, input shape,
preprocessing). :func:`load_model` also reads the formats people receive models in — Keras
HDF5/``.keras``, ONNX, TorchScript and plain PyTorch ``state_dict`` files — and turns each into
a :class:`~deepdot.models.Classifier`. Which format a path is, and how each is read and written,
is the table in :mod:`deepdot.io.formats` (deepdot's own format is defined there too;
:func:`model_paths` and :func:`save_model` are re-exported here).

Models are untrusted input: nothing here runs code from a file. Keras and ONNX files are
converted layer by layer, ``torch.load`` always runs with ``weights_only=True``, TorchScript
archives run only after their every operator is checked against an allow-list of pure tensor
operations (:mod:`deepdot.io.torchscript`), and a pickled whole ``nn.Module`` (which can run
arbitrary code when unpickled) is refused — unless the caller explicitly passes
``allow_code=True`` for a file it trusts.
"""

from __future__ import annotations

from pathlib import Path

import torch

from deepdot.errors import ModelError
from deepdot.io.foreign import check_finite
from deepdot.io.formats import (
    FORMAT,
    FORMAT_VERSION,
    KERAS,
    ONNX,
    TORCHSCRIPT,
    file_suffixes,
    format_for,
    is_deepdot_path,
    model_paths,
    save_model,
)
from deepdot.models import Classifier, Preprocess, PreprocessSpec

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "KERAS_SUFFIXES",
    "ONNX_SUFFIXES",
    "TORCH_SUFFIXES",
    "load_model",
    "model_digest",
    "model_file",
    "model_paths",
    "save_model",
]

#: The suffixes of each format (kept for callers; the table is :data:`deepdot.io.formats.MODEL_FORMATS`).
KERAS_SUFFIXES = KERAS.suffixes
ONNX_SUFFIXES = ONNX.suffixes
TORCH_SUFFIXES = TORCHSCRIPT.suffixes


def model_file(path: str | Path) -> Path:
    """The model :func:`load_model` reads for ``path``.

    A folder without ``model.safetensors`` but with exactly one ``model.<suffix>`` of another
    format (``deepdot mitigate`` writes the repaired model so when the input was, say, ONNX)
    stands for that file; any other path stands for itself.
    """
    p = Path(path).expanduser()
    if p.is_dir() and not (p / "model.safetensors").exists():
        found = [p / f"model{s}" for s in file_suffixes()]
        found = [f for f in found if f.is_file()]
        if len(found) == 1:
            return found[0]
    return p


def model_digest(path: str | Path) -> str:
    """SHA-256 over every file :func:`load_model` reads for ``path`` (the model file, and its
    ``model.json`` or ``<stem>.json`` beside it), so that a result is never reused for other bytes."""
    import hashlib

    p = model_file(path)
    if is_deepdot_path(p):
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


def load_model(
    path: str | Path,
    *,
    preprocess: PreprocessSpec | None = None,
    device: str | torch.device = "cpu",
    arch: str | None = None,
    allow_code: bool = False,
    input_shape: tuple[int, int, int] | None = None,
    allow_pickle: bool = False,
) -> Classifier:
    """Load a model file of any supported format as a :class:`Classifier`.

    The format follows the suffix (the table is :data:`deepdot.io.formats.MODEL_FORMATS`):

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
            nothing is recorded; Neural Cleanse's Keras models need ``"raw"``): a
            :class:`~deepdot.models.Preprocess` or anything its ``parse`` reads.
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
    given = Preprocess.parse(preprocess) if preprocess is not None else None
    p = model_file(path)
    if not is_deepdot_path(p) and not p.is_file():
        raise ModelError(f"{p}: no such model file")
    fmt = format_for(p)  # an unknown suffix: one line naming the suffixes deepdot reads
    classifier = fmt.read(
        p, preprocess=given, arch=arch, allow_code=allow_code or allow_pickle, input_shape=input_shape
    )
    check_finite(classifier.network, p)
    return classifier.to(device).eval()
