"""The one model wrapper everything in deepdot talks to.

A :class:`Classifier` takes images as float32 tensors in [0, 1] (N×C×H×W) and returns logits.
It owns the model's own input preprocessing, the device and eval mode, and gives access to the
activations of named layers (the mitigations need them). Triggers are therefore always applied
in pixel space, before preprocessing, as Neural Cleanse does.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from deepdot.errors import ModelError
from deepdot.models.preprocess import PREPROCESS_NAMES, Preprocess, PreprocessSpec

__all__ = ["OUTPUT_KINDS", "PREPROCESS_NAMES", "Classifier", "Preprocess", "parse_preprocess", "preprocess_tensor"]

#: What a model file's network outputs: raw class scores, or softmax probabilities.
OUTPUT_KINDS = ("logits", "probabilities")


def parse_preprocess(spec: PreprocessSpec) -> str | dict[str, list[float]]:
    """Validate a preprocessing spec; the former plain form of :meth:`Preprocess.parse`.

    Accepts what :meth:`Preprocess.parse` accepts and returns its JSON form (a name from
    :data:`PREPROCESS_NAMES` or ``{"mean": [...], "std": [...]}``), as it always did. New code
    should use :class:`Preprocess` itself.
    """
    return Preprocess.parse(spec).to_json()


def preprocess_tensor(x: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """Map [0, 1] pixels (N×C×H×W) to the network's input scale: ``Preprocess.parse(spec)(x)``."""
    return Preprocess.parse(spec)(x)


class Classifier(nn.Module):
    """A network plus everything needed to feed it [0, 1] images.

    Args:
        network: maps preprocessed N×C×H×W input to logits (N×num_classes).
        input_shape: (C, H, W) the network expects.
        num_classes: number of output labels.
        preprocess: a :class:`~deepdot.models.preprocess.Preprocess`, or anything
            :meth:`Preprocess.parse <deepdot.models.preprocess.Preprocess.parse>` reads (a name
            from :data:`PREPROCESS_NAMES`, ``{"mean": [...], "std": [...]}``, ``"mean=… std=…"``).
            It is kept as a ``Preprocess`` (:attr:`preprocess`), also when assigned later.
        architecture: registry name of the architecture, if built in (kept for saving).
        arch_kwargs: keyword arguments the architecture was built with.
        last_conv_layer / penultimate_layer: names of modules in ``network`` (see
            :meth:`activations`), used by the mitigations.
        output_kind: what the model as given outputs: ``"logits"`` or ``"probabilities"`` (it
            ended in a softmax, as most Keras models do). Either way :meth:`forward` returns
            logits-equivalent scores (``log_softmax`` of them gives the log-probabilities), so
            cross-entropy and argmax work unchanged.
        softmax_removed: with ``output_kind="probabilities"``, whether the loader already removed
            the final softmax from ``network`` (then it returns logits); otherwise
            :meth:`forward` takes the logarithm of the probabilities.
    """

    def __init__(
        self,
        network: nn.Module,
        *,
        input_shape: Sequence[int],
        num_classes: int,
        preprocess: PreprocessSpec = "unit",
        architecture: str | None = None,
        arch_kwargs: dict[str, Any] | None = None,
        last_conv_layer: str | None = None,
        penultimate_layer: str | None = None,
        output_kind: str = "logits",
        softmax_removed: bool = False,
    ) -> None:
        super().__init__()
        self.network = network
        self.input_shape = tuple(int(v) for v in input_shape)
        self.num_classes = int(num_classes)
        self.preprocess = preprocess  # type: ignore[assignment]  # the setter parses it
        self.architecture = architecture
        self.arch_kwargs = dict(arch_kwargs or {})
        self.last_conv_layer = last_conv_layer
        self.penultimate_layer = penultimate_layer
        if output_kind not in OUTPUT_KINDS:
            raise ModelError(f"unknown output kind {output_kind!r}: use one of {', '.join(OUTPUT_KINDS)}")
        self.output_kind = output_kind
        self.softmax_removed = bool(softmax_removed) and output_kind == "probabilities"
        self.eval()

    @property
    def preprocess(self) -> Preprocess:
        """The model's input preprocessing; assigning a name, mapping or text parses it."""
        return self._preprocess

    @preprocess.setter
    def preprocess(self, spec: PreprocessSpec) -> None:
        self._preprocess = Preprocess.parse(spec)

    # -- inference -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for [0, 1] images. Shape: N×C×H×W -> N×num_classes.

        For a network that outputs probabilities (softmax not removable) this is their logarithm,
        which differs from the logits only by a per-image constant.
        """
        out = self.network(self.preprocess(x))
        if self.output_kind == "probabilities" and not self.softmax_removed:
            out = out.clamp_min(1e-30).log()
        return out

    @property
    def output_note(self) -> str:
        """One line saying what the model outputs and what deepdot works on (for reports)."""
        if self.output_kind == "logits":
            return "logits"
        if self.softmax_removed:
            return "probabilities (final softmax removed: deepdot works on the logits before it)"
        return "probabilities (deepdot works on their logarithm)"

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Predicted labels (N,) for [0, 1] images, in eval mode, batched."""
        was_training = self.training
        self.eval()
        out = [self(x[i : i + batch_size].to(self.device)).argmax(1).cpu() for i in range(0, len(x), batch_size)]
        self.train(was_training)
        return torch.cat(out) if out else torch.empty(0, dtype=torch.long)

    # -- layers ----------------------------------------------------------------------------
    def layer_names(self) -> list[str]:
        """Names of the network's modules, usable with :meth:`activations`."""
        return [name for name, _ in self.network.named_modules() if name]

    def _module(self, name: str) -> nn.Module:
        modules = dict(self.network.named_modules())
        if name not in modules or not name:
            raise ModelError(f"no layer named {name!r}; layers are: {', '.join(self.layer_names())}")
        return modules[name]

    @contextmanager
    def capture(self, name: str) -> Iterator[list[torch.Tensor]]:
        """Record the output of layer ``name`` on every forward pass inside the ``with`` block."""
        outputs: list[torch.Tensor] = []
        handle = self._module(name).register_forward_hook(lambda _m, _i, out: outputs.append(out))
        try:
            yield outputs
        finally:
            handle.remove()

    @torch.no_grad()
    def activations(self, x: torch.Tensor, name: str, batch_size: int = 512) -> torch.Tensor:
        """Output of layer ``name`` for [0, 1] images, concatenated over batches (eval mode)."""
        was_training = self.training
        self.eval()
        with self.capture(name) as outputs:
            for i in range(0, len(x), batch_size):
                self(x[i : i + batch_size].to(self.device))
        self.train(was_training)
        return torch.cat([o.cpu() for o in outputs])

    def describe(self) -> dict[str, Any]:
        """Metadata written beside the weights (``model.json``)."""
        return {
            "architecture": self.architecture,
            "arch_kwargs": self.arch_kwargs,
            "num_classes": self.num_classes,
            "input_shape": list(self.input_shape),
            "preprocess": self.preprocess.to_json(),
            "last_conv_layer": self.last_conv_layer,
            "penultimate_layer": self.penultimate_layer,
            "output_kind": self.output_kind,
        }
