"""Writing a model back in the format it was read from (the repaired model of ``deepdot mitigate``).

=====================================  ===========================================================
model read from                        written to the output folder
=====================================  ===========================================================
folder, ``.safetensors``, ``.json``    ``model.safetensors`` + ``model.json`` (:func:`save_model`)
``.h5`` / ``.hdf5`` / ``.keras``       ``model.<suffix>``: a copy of the input file holding the
``.onnx``                              new weights (same layers and names, so the written model
                                       loads back with the same layer names; same final softmax
                                       and input layout)
TorchScript ``.pt`` …                  ``model.<suffix>``, TorchScript, metadata embedded
``state_dict`` ``.pt`` …               ``model.<suffix>``, a ``state_dict`` (read with ``weights_only``)
pickled module (``allow_pickle``)      ``model.pt`` as TorchScript: never a pickle
=====================================  ===========================================================

Beside a file of another format than deepdot's own, ``model.json`` is the sidecar
:func:`~deepdot.io.models.load_model` reads: the preprocessing and input shape (and, for a
``state_dict``, the architecture), so the written model loads back as it was used, without
``--preprocess`` or ``--arch``.

:func:`check_save_as` decides the format and tries it on the model before any long work (a trial
write into a temporary folder, loaded back and compared); :func:`save_model_as` writes, with the
format's writer from the table of :mod:`deepdot.io.formats` (where each writer is defined).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from deepdot.errors import DeepdotError, ModelError
from deepdot.io.foreign import first_line
from deepdot.io.formats import DEEPDOT, STATE_DICT, TORCHSCRIPT, ModelFormat, find_format, format_named, writable
from deepdot.io.models import load_model, model_file
from deepdot.models import Classifier

#: What :func:`save_model_as` can write: the names of the formats in the table that have a writer.
SAVE_KINDS = tuple(f.name for f in writable())


@dataclass(frozen=True)
class SaveFormat:
    """How a model is written.

    Attributes:
        kind: one of :data:`SAVE_KINDS`, the name of a format in :mod:`deepdot.io.formats`.
        suffix: of the model file, ``model<suffix>`` in the output folder.
        note: one line for the user when this is not the input's format (else empty).
    """

    kind: str
    suffix: str
    note: str = ""

    @property
    def model_format(self) -> ModelFormat:
        """The format's record in the table (its title, its writer)."""
        return format_named(self.kind)

    def file(self, out: str | Path) -> Path:
        """The model file written to the folder ``out``."""
        return Path(out).expanduser() / f"model{self.suffix}"


def save_format(classifier: Classifier, source: str | Path) -> SaveFormat:
    """The format of the model file ``source`` that ``classifier`` was loaded from (no trial).

    Raises:
        ModelError: ``source`` is no format deepdot reads.
    """
    p = model_file(source)
    fmt = find_format(p)
    if fmt is DEEPDOT:
        return SaveFormat(DEEPDOT.name, DEEPDOT.suffixes[0])
    if fmt is None or fmt.write is None:
        raise ModelError(f"{p}: unsupported model format {p.suffix!r}; cannot write a model in it")
    if fmt is STATE_DICT and classifier.architecture is None:  # read as a pickled whole model
        return SaveFormat(
            TORCHSCRIPT.name,
            TORCHSCRIPT.suffixes[0],
            f"{p} holds a pickled model: the repaired one is written as TorchScript (model.pt), "
            "which loads without --allow-pickle",
        )
    return SaveFormat(fmt.name, p.suffix.lower())


def check_save_as(classifier: Classifier, source: str | Path) -> SaveFormat:
    """The format :func:`save_model_as` will write ``classifier`` in, checked now.

    Call it before a long computation: a trial write of ``classifier`` in the input's format,
    loaded back and compared with it on random images, shows the format can hold the model. If
    it cannot, a built-in architecture falls back to deepdot's own format (the returned format's
    ``note`` says so).

    Raises:
        ModelError: the model can be written neither in its own format nor in deepdot's.
    """
    fmt = save_format(classifier, source)
    if fmt.kind == DEEPDOT.name:
        return fmt
    try:
        _trial(classifier, source, fmt)
    except Exception as exc:  # noqa: BLE001 - exporters fail in many ways; all mean "not in this format"
        reason = str(exc) if isinstance(exc, DeepdotError) else first_line(exc)
        reason = reason.removeprefix(f"{model_file(source)}: ")
        what = f"the repaired model cannot be written as {fmt.model_format.title} ({reason})"
        if classifier.architecture is None:
            raise ModelError(f"{model_file(source)}: {what}; nothing was changed") from exc
        return SaveFormat(DEEPDOT.name, DEEPDOT.suffixes[0], f"{what}: writing model.safetensors + model.json instead")
    return fmt


def _trial(classifier: Classifier, source: str | Path, fmt: SaveFormat) -> None:
    """Write ``classifier`` as ``fmt`` into a temporary folder and check that it loads back the same."""
    was_training = classifier.training
    classifier.eval()
    try:
        probe = torch.rand(4, *classifier.input_shape, generator=torch.Generator().manual_seed(0))
        with tempfile.TemporaryDirectory(prefix="deepdot-save-") as tmp:
            try:
                save_model_as(classifier, source, tmp, fmt=replace(fmt, note=""))
                reloaded = load_model(fmt.file(tmp))
            except DeepdotError as exc:  # name no temporary file in the message
                raise ModelError(str(exc).replace(f"{Path(tmp).expanduser()}/", "")) from exc
            with torch.no_grad():
                expected = classifier(probe.to(classifier.device)).cpu()
                got = reloaded(probe)
    finally:
        classifier.train(was_training)
    if got.shape != expected.shape:
        raise ModelError(f"it loads back with output {tuple(got.shape)} instead of {tuple(expected.shape)}")
    scale = max(1.0, float(expected.abs().max()))
    diff = float((got - expected).abs().max())
    if not diff <= 1e-3 * scale:
        raise ModelError(f"it loads back with outputs off by up to {diff:.3g}")


def save_model_as(
    classifier: Classifier, source: str | Path, out: str | Path, *, fmt: SaveFormat | None = None
) -> list[Path]:
    """Write ``classifier`` to the folder ``out`` in the format of ``source``, the model it was
    loaded from (see the module's table); returns the paths written, the model file first.

    Args:
        classifier: the model to write (e.g. a repaired copy of the one loaded from ``source``).
        source: the model file or folder ``classifier`` was loaded from.
        out: the output folder (created if needed).
        fmt: the format, as decided by :func:`check_save_as` (default: ``source``'s, untried).

    Raises:
        ModelError: one line naming the file and the problem.
    """
    fmt = fmt or save_format(classifier, source)
    path = fmt.file(out)
    _check_unhooked(classifier.network, path)
    writers = {f.name: f.write for f in writable()}
    write = writers.get(fmt.kind)
    if write is None:
        raise ModelError(f"{path}: unknown model format {fmt.kind!r}; deepdot writes {', '.join(writers)}")
    return write(classifier, model_file(source), path)


def _check_unhooked(network: nn.Module, path: Path) -> None:
    """Refuse a network with forward hooks: what they do (e.g. switching units off) is in no file.

    The mitigations bake their changes into the weights and remove their hooks; loaded models
    have none. This guards that assumption, so a written model always carries the repair.
    """
    hooked = [name or "the network" for name, m in network.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    if hooked:
        raise ModelError(f"{path}: layer {hooked[0]!r} has a forward hook, whose effect no model file can hold")
