"""A model's input preprocessing as one value: :class:`Preprocess`.

deepdot always hands a model images in [0, 1]; a :class:`Preprocess` maps them to what the
network was trained on. It is either a named scheme (:data:`PREPROCESS_NAMES`) or a per-channel
``(x - mean) / std``. It is read once, where it enters deepdot, and from then on passed as this
value:

* :meth:`Preprocess.parse` reads what a person or a caller gives: a name, the command-line
  form ``"mean=a,b,c std=d,e,f"``, a ``{"mean": [...], "std": [...]}`` mapping, or a
  :class:`Preprocess` (returned as it is);
* :meth:`Preprocess.from_json` reads what a file recorded: the JSON value of ``model.json`` or a
  sidecar (a name or a ``{"mean", "std"}`` object), or the JSON text an ONNX file's
  ``metadata_props`` holds (values there are strings);
* :meth:`Preprocess.to_json` gives the JSON value stored in ``model.json``, sidecars and the
  scan checkpoint key, :meth:`Preprocess.to_metadata` the text stored in ONNX metadata, and
  ``str()`` the command-line form. All three read back to an equal value.

For code written when preprocessing was a bare ``str | dict``, a :class:`Preprocess` compares
equal to the name or mapping it stands for (``Preprocess("raw") == "raw"``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import torch

from deepdot.errors import ModelError

#: Named preprocessing schemes. Each maps [0, 1] pixels to what the network was trained on:
#: ``raw`` 0-255, ``unit`` unchanged, ``imagenet`` Keras/caffe style (BGR, 0-255, mean-centred),
#: ``inception`` [-1, 1].
PREPROCESS_NAMES = ("raw", "unit", "imagenet", "inception")

_IMAGENET_BGR_MEAN = (103.939, 116.779, 123.68)
_USAGE = f"use one of {', '.join(PREPROCESS_NAMES)} or 'mean=a,b,c std=d,e,f'"


@dataclass(frozen=True, eq=False)
class Preprocess:
    """How [0, 1] pixels (N×C×H×W) are mapped to a network's input; call it on a batch.

    Exactly one of the two forms: ``Preprocess("imagenet")`` (a name from
    :data:`PREPROCESS_NAMES`) or ``Preprocess(mean=(...), std=(...))`` (one value per channel,
    or one for all; every std > 0). Sequences are stored as tuples of floats.

    Attributes:
        name: the named scheme, or None for mean/std.
        mean / std: the per-channel values (empty for a named scheme).

    Raises:
        ModelError: neither or both forms, an unknown name, or bad mean/std values.
    """

    name: str | None = None
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.name is not None:
            if self.mean or self.std:
                raise ModelError("preprocess is either a name or mean/std, not both")
            if self.name not in PREPROCESS_NAMES:
                raise ModelError(f"unknown preprocess {self.name!r}: {_USAGE}")
            return
        mean, std = _checked(self.mean, self.std, {"mean": self.mean, "std": self.std})
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    # -- reading -----------------------------------------------------------------------------
    @classmethod
    def parse(cls, spec: PreprocessSpec) -> Preprocess:
        """The preprocessing a person or caller gave: a name, ``"mean=a,b,c std=d,e,f"``, a
        mapping with exactly the keys ``mean`` and ``std``, or a :class:`Preprocess`.

        Raises:
            ModelError: one line saying what is wrong and what is accepted.
        """
        if isinstance(spec, Preprocess):
            return spec
        if isinstance(spec, Mapping):
            if set(spec) != {"mean", "std"}:
                raise ModelError(f"preprocess dict needs exactly 'mean' and 'std', got {sorted(spec)}")
            mean, std = _checked(spec["mean"], spec["std"], spec)
            return cls(mean=mean, std=std)
        text = str(spec).strip()
        if text in PREPROCESS_NAMES:
            return cls(text)
        if text.startswith("mean="):
            try:
                parts = dict(p.split("=", 1) for p in text.split())
                means = [float(v) for v in parts["mean"].split(",")]
                stds = [float(v) for v in parts["std"].split(",")]
            except (KeyError, ValueError) as exc:
                raise ModelError(f"cannot read preprocess {text!r}: expected 'mean=a,b,c std=d,e,f'") from exc
            mean, std = _checked(means, stds, {"mean": means, "std": stds})
            return cls(mean=mean, std=std)
        raise ModelError(f"unknown preprocess {text!r}: {_USAGE}")

    @classmethod
    def from_json(cls, value: Any) -> Preprocess:
        """The preprocessing a file recorded: a JSON value as :meth:`to_json` gives, or the text
        of one as :meth:`to_metadata` gives (anything :meth:`parse` reads is accepted too).

        Raises:
            ModelError: the record is not valid JSON or no valid preprocessing.
        """
        if isinstance(value, str) and value.strip().startswith("{"):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ModelError(f"recorded preprocess {value!r} is not valid JSON") from exc
        return cls.parse(value)

    # -- writing -----------------------------------------------------------------------------
    def to_json(self) -> str | dict[str, list[float]]:
        """The JSON value recorded in ``model.json``, sidecars and checkpoint keys: the name, or
        ``{"mean": [...], "std": [...]}`` (keys in that order)."""
        if self.name is not None:
            return self.name
        return {"mean": list(self.mean), "std": list(self.std)}

    def to_metadata(self) -> str:
        """The text recorded in ONNX ``metadata_props``: the name, or the JSON object as text."""
        value = self.to_json()
        return value if isinstance(value, str) else json.dumps(value)

    def __str__(self) -> str:
        """The command-line form: ``unit`` or ``mean=0.5,0.5 std=0.25,0.25``."""
        if self.name is not None:
            return self.name
        return f"mean={','.join(map(str, self.mean))} std={','.join(map(str, self.std))}"

    def __repr__(self) -> str:
        if self.name is not None:
            return f"Preprocess({self.name!r})"
        return f"Preprocess(mean={self.mean!r}, std={self.std!r})"

    # -- comparing ---------------------------------------------------------------------------
    def __eq__(self, other: object) -> bool:
        """Equal to a Preprocess of the same form and values, and to a name or mapping that
        :meth:`parse` reads as one (for code that compares with the former ``str | dict``)."""
        if isinstance(other, Preprocess):
            return (self.name, self.mean, self.std) == (other.name, other.mean, other.std)
        if isinstance(other, str | Mapping):
            try:
                return self == Preprocess.parse(other)
            except ModelError:
                return False
        return NotImplemented

    def __hash__(self) -> int:
        # A named scheme hashes as its name, so that it may equal the bare string.
        return hash(self.name) if self.name is not None else hash((self.mean, self.std))

    # -- applying ----------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Map [0, 1] pixels (N×C×H×W) to the network's input scale (same shape)."""
        if self.name == "unit":
            return x
        if self.name == "raw":
            return x * 255.0
        if self.name == "inception":
            return x * 2.0 - 1.0
        if self.name == "imagenet":
            # Keras/caffe style: RGB -> BGR, 0-255, mean-centred per channel.
            bgr = x.flip(1) * 255.0
            mean = torch.tensor(_IMAGENET_BGR_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            return bgr - mean
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std


def _checked(mean: Any, std: Any, shown: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``mean`` and ``std`` as tuples of floats, checked: numbers, as many of each, at least one,
    every std > 0. Else a ModelError showing ``shown`` (the values as the caller gave them)."""
    try:
        means = tuple(float(v) for v in mean)
        stds = tuple(float(v) for v in std)
    except (TypeError, ValueError):  # not numbers: reported as below
        means, stds = (), ()
    if len(means) != len(stds) or not means or any(s <= 0 for s in stds):
        raise ModelError(f"preprocess mean/std must be non-empty, of equal length, std > 0: {shown}")
    return means, stds


#: What :meth:`Preprocess.parse` accepts (and every ``preprocess=`` argument in deepdot).
PreprocessSpec: TypeAlias = Preprocess | str | Mapping[str, Sequence[float]]
