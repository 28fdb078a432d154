"""Building blocks shared by the model-format converters (Keras HDF5, ONNX).

A converter turns a foreign model file into an ordinary PyTorch module made of standard layers
(``nn.Conv2d``, ``nn.Linear``, ``nn.BatchNorm2d`` …) so that gradients flow through it and the
mitigations can hook its named layers. Graphs that are not a plain chain become a
:class:`GraphNetwork`: named layers run in a fixed order over named tensors.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True, kw_only=True)
class ConvertedModel:
    """A foreign model turned into PyTorch, plus what its file said about itself.

    Attributes:
        network: maps preprocessed N×C×H×W input to the model's output.
        input_shape: (C, H, W) the network takes, when the file records it.
        output_kind: ``"logits"``, or ``"probabilities"`` when the model ended in a softmax.
        softmax_removed: the final softmax was dropped, so ``network`` returns its logits.
        last_conv_layer / penultimate_layer: best guesses at these named modules (or None).
        metadata: anything else the file said (e.g. ``preprocess``).
        layer_modules: each layer of the file (a Keras layer's name; an ONNX node's first
            output) -> the name of the module in ``network`` made from it; the writers that put
            repaired weights back into a copy of the file follow it.
    """

    network: nn.Module
    input_shape: tuple[int, ...] | None
    output_kind: str = "logits"
    softmax_removed: bool = False
    last_conv_layer: str | None = None
    penultimate_layer: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    layer_modules: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Step:
    """One layer call in a :class:`GraphNetwork`: ``output = layer(*inputs)`` (tensor names)."""

    layer: str
    inputs: tuple[str, ...]
    output: str


class GraphNetwork(nn.Module):
    """Runs named layers over named tensors in a fixed (topological) order.

    Layers are registered directly on the module under their own names, so
    ``named_modules()`` gives the names of the original file.

    Args:
        input_name: name of the tensor fed to :meth:`forward`.
        steps: layer calls, in an order where every input is computed before it is used.
        output_name: name of the tensor returned.
        layers: the modules the steps call, by name.
        constants: fixed tensors (weights used directly by arithmetic ops) by tensor name.
    """

    def __init__(
        self,
        input_name: str,
        steps: Sequence[Step],
        output_name: str,
        layers: dict[str, nn.Module],
        constants: dict[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        _check_order(input_name, steps, output_name, layers, constants or {})
        self.input_name = input_name
        self.steps = list(steps)
        self.output_name = output_name
        for name, layer in layers.items():
            self.add_module(name, layer)
        self._constant_buffers: dict[str, str] = {}
        for i, (name, value) in enumerate((constants or {}).items()):
            buffer = f"constant_{i}"
            self.register_buffer(buffer, value)
            self._constant_buffers[name] = buffer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values: dict[str, torch.Tensor] = {self.input_name: x}
        for name, buffer in self._constant_buffers.items():
            values[name] = getattr(self, buffer)
        for step in self.steps:
            values[step.output] = getattr(self, step.layer)(*(values[i] for i in step.inputs))
        return values[self.output_name]


def _check_order(
    input_name: str,
    steps: Sequence[Step],
    output_name: str,
    layers: dict[str, nn.Module],
    constants: dict[str, torch.Tensor],
) -> None:
    """Raise ValueError unless every step calls a known layer on tensors computed before it and
    the output is computed: a graph read from a file may name tensors nothing produces, or be
    out of order or cyclic, and must fail here rather than in the middle of a forward pass."""
    available = {input_name, *constants}
    for step in steps:
        if step.layer not in layers:
            raise ValueError(f"step {step.output!r} calls an unknown layer {step.layer!r}")
        missing = [i for i in step.inputs if i not in available]
        if missing:
            raise ValueError(
                f"layer {step.layer!r} reads tensor {missing[0]!r}, which nothing computes before it "
                "(a missing tensor, or a graph out of order or with a cycle)"
            )
        available.add(step.output)
    if output_name not in available:
        raise ValueError(f"the output tensor {output_name!r} is never computed")


def module_name(raw: str, taken: set[str] | dict[str, Any], fallback: str = "layer") -> str:
    """A valid, unused ``nn.Module`` attribute name derived from ``raw`` (e.g. ``/conv1/Conv``)."""
    name = re.sub(r"[^0-9A-Za-z_]", "_", raw.strip("/")).strip("_") or fallback
    if name[0].isdigit():
        name = f"{fallback}_{name}"
    reserved = set(dir(nn.Module)) | {"steps", "input_name", "output_name"}
    candidate, n = name, 1
    while candidate in taken or candidate in reserved:
        n += 1
        candidate = f"{name}_{n}"
    return candidate


# -- checks shared by the converters ------------------------------------------------------------
#: Largest padding (pixels on one side) a converted layer may add: a corrupt or hostile file must
#: not make a forward pass allocate gigabytes (real models pad by a few pixels).
MAX_PADDING = 1024
#: Largest number of input channels a converted model may declare.
MAX_CHANNELS = 64


def short_reason(exc: BaseException) -> str:
    """``"TypeName: first line"`` of an exception, at most 200 characters, for one-line messages
    (control characters, which a hostile file can put into names, are shown escaped)."""
    text = str(exc).strip()
    first = text.splitlines()[0].strip() if text else ""
    first = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in first)
    return f"{type(exc).__name__}: {first}"[:200] if first else type(exc).__name__


def check_padding(values: Sequence[Any], what: str) -> None:
    """Raise ValueError unless every padding amount is a whole number in 0..MAX_PADDING."""
    for value in values:
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or not 0 <= value <= MAX_PADDING:
            raise ValueError(f"{what} pads by {value!r} pixels; deepdot accepts 0 to {MAX_PADDING}")


def check_input_shape(path: Any, shape: Sequence[int] | None) -> None:
    """Raise ModelError when a model declares input images too large to probe safely."""
    from deepdot.errors import ModelError
    from deepdot.io.limits import IMAGE_PIXELS

    if shape is None:
        return
    c, h, w = (int(v) for v in shape)
    if not 0 < c <= MAX_CHANNELS:
        raise ModelError(f"{path}: the model declares {c} input channels; deepdot accepts 1 to {MAX_CHANNELS}")
    if h <= 0 or w <= 0:
        raise ModelError(f"{path}: the model declares input images of {h}×{w} pixels")
    IMAGE_PIXELS.check(h * w, f"{path}: the model's {h}×{w} input images", ModelError)


# -- layers that plain torch.nn does not offer -------------------------------------------------
class Add(nn.Module):
    """Element-wise sum of any number of tensors (Keras ``Add``, ONNX ``Add``)."""

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        out = xs[0]
        for x in xs[1:]:
            out = out + x
        return out


class Arithmetic(nn.Module):
    """Element-wise binary arithmetic: ``op`` is one of ``sub``, ``mul``, ``div``."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.op == "sub":
            return a - b
        if self.op == "mul":
            return a * b
        return a / b


class Concat(nn.Module):
    """Concatenation along ``dim``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return torch.cat(xs, dim=self.dim)


class Permute(nn.Module):
    """``x.permute(*dims)``; e.g. channels-first to channels-last before a Keras ``Flatten``."""

    def __init__(self, dims: Sequence[int]) -> None:
        super().__init__()
        self.dims = tuple(int(d) for d in dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.dims)


class ChannelsLastFlatten(nn.Module):
    """Keras ``Flatten`` on a channels-last model: flatten N×C×H×W in H, W, C order."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            x = x.permute(0, 2, 3, 1)
        return x.flatten(1)


class AnyRankBatchNorm(nn.BatchNorm2d):
    """Batch normalisation over dimension 1 of an N×C (dense) or N×C×H×W (conv) tensor."""

    def _check_input_dim(self, input: torch.Tensor) -> None:  # noqa: A002 - torch's signature
        if input.dim() not in (2, 3, 4):
            raise ValueError(f"batch norm expects a 2-4 dimensional input, got {input.dim()}")


def batch_norm(gamma: Any, beta: Any, mean: Any, var: Any, eps: float) -> AnyRankBatchNorm:
    """An eval-ready batch-norm layer holding the given statistics (array-likes of length C).

    Raises:
        ValueError: the four statistics do not all hold C values, or ``eps`` is not positive.
    """
    values = [torch.as_tensor(v, dtype=torch.float32).flatten() for v in (gamma, beta, mean, var)]
    sizes = [len(v) for v in values]
    if len(set(sizes)) != 1 or sizes[0] == 0:
        raise ValueError(f"batch norm statistics of different lengths (scale, offset, mean, variance: {sizes})")
    if not float(eps) >= 0:
        raise ValueError(f"batch norm epsilon {eps} is negative")
    bn = AnyRankBatchNorm(sizes[0], eps=float(eps))
    with torch.no_grad():
        bn.weight.copy_(values[0])
        bn.bias.copy_(values[1])
        assert bn.running_mean is not None and bn.running_var is not None  # track_running_stats=True
        bn.running_mean.copy_(values[2])
        bn.running_var.copy_(values[3])
    return bn


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """(before, after) padding of TensorFlow's ``'same'`` mode along one axis (extra goes after)."""
    effective = (kernel - 1) * dilation + 1
    total = max((math.ceil(size / stride) - 1) * stride + effective - size, 0)
    return total // 2, total - total // 2


class SamePad2d(nn.Module):
    """TensorFlow-style ``'same'`` padding, computed from the input size at run time.

    Args:
        kernel, stride, dilation: (height, width) pairs of the layer that follows.
        value: fill value (``-inf`` before max pooling).
        lower: put the extra pixel before rather than after (ONNX ``SAME_LOWER``).
    """

    def __init__(
        self,
        kernel: Sequence[int],
        stride: Sequence[int],
        dilation: Sequence[int] = (1, 1),
        value: float = 0.0,
        lower: bool = False,
    ) -> None:
        super().__init__()
        self.kernel, self.stride, self.dilation = tuple(kernel), tuple(stride), tuple(dilation)
        if not len(self.kernel) == len(self.stride) == len(self.dilation) == 2:
            raise ValueError(
                f"'same' padding of a 2-D layer with kernel {kernel}, strides {stride}, dilations {dilation}"
            )
        for k, s, d in zip(self.kernel, self.stride, self.dilation, strict=True):
            if not (0 < k and 0 < s <= MAX_PADDING and 0 < d and (k - 1) * d <= 2 * MAX_PADDING):
                raise ValueError(
                    f"'same' padding for kernel {kernel}, strides {stride}, dilations {dilation} would pad by "
                    f"more than {MAX_PADDING} pixels"
                )
        self.value = value
        self.lower = lower

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (top, bottom), (left, right) = (
            same_padding(x.shape[2 + i], self.kernel[i], self.stride[i], self.dilation[i]) for i in range(2)
        )
        if self.lower:
            top, bottom, left, right = bottom, top, right, left
        if top == bottom == left == right == 0:
            return x
        return F.pad(x, (left, right, top, bottom), value=self.value)


class SameAvgPool2d(nn.Module):
    """Average pooling with TensorFlow ``'same'`` padding (padded pixels are not counted)."""

    def __init__(self, kernel: Sequence[int], stride: Sequence[int]) -> None:
        super().__init__()
        self.pad = SamePad2d(kernel, stride)
        self.kernel, self.stride = tuple(kernel), tuple(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = F.avg_pool2d(self.pad(x), self.kernel, self.stride)
        ones = torch.ones_like(x[:1, :1])
        count = F.avg_pool2d(self.pad(ones), self.kernel, self.stride)
        return total / count


def chain(*named: tuple[str, nn.Module | None]) -> nn.Module:
    """One module for a layer made of parts (padding, conv, activation); None parts are skipped."""
    parts = [(name, module) for name, module in named if module is not None]
    if len(parts) == 1:
        return parts[0][1]
    return nn.Sequential(OrderedDict(parts))
