"""Units of a layer: their activations, switching them off during a forward pass, and baking
that switch into the weights so a pruned model saves and reloads as an ordinary model.

A *unit* is a neuron of a dense layer or a channel of a convolutional feature map (a channel's
activation is its spatial mean, as in Fine-Pruning, Liu et al., RAID 2018, Sec. 4).

Baking does not rely on how the network is put together (an ``nn.Sequential``, a converted
ONNX/Keras graph, a Keras layer with its activation nested inside): the modules are located by
the order they run in on real images, and every candidate change is kept only if the model then
computes exactly what switching the units off with a hook computes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from deepdot.mitigate.base import MitigationError, copy_classifier
from deepdot.models import Classifier

#: Layer names the mitigations understand besides module names.
LAYER_ALIASES = ("penultimate", "last_conv")

#: How many producing (or consuming) modules are tried before giving up.
_MAX_CANDIDATES = 4

_BatchNorm = nn.modules.batchnorm._BatchNorm


def is_torchscript(classifier: Classifier) -> bool:
    """Whether the network is TorchScript, whose modules take no forward hooks (so the units of its
    layers can be neither read nor switched off)."""
    return isinstance(classifier.network, torch.jit.ScriptModule)


def resolve_layer(classifier: Classifier, layer: str, method: str = "this mitigation") -> str:
    """The module name for ``layer``: ``penultimate`` / ``last_conv`` name the classifier's
    recorded layers; anything else must be a module name.

    Raises:
        MitigationError: the network is TorchScript (its layers cannot be hooked), the model does
            not record the aliased layer, or no module has that name.
    """
    if is_torchscript(classifier):
        raise MitigationError(
            f"{method} cannot run on a TorchScript model: it works on the units of layer {layer!r} through "
            "forward hooks, which TorchScript modules do not take; use unlearning or fine-tuning, or give "
            "the model as ONNX, Keras, safetensors or a state_dict",
            settings=("method",),
        )
    if layer == "penultimate":
        name = classifier.penultimate_layer
    elif layer == "last_conv":
        name = classifier.last_conv_layer
    else:
        name = layer
    if not name:
        raise MitigationError(
            f"the model does not record its {layer.replace('_', ' ')} layer; name one "
            f"(layers: {', '.join(classifier.layer_names())})",
            settings=("layer",),
        )
    module = classifier._module(name)  # raises a one-line error for an unknown name
    if isinstance(module, torch.jit.ScriptModule):
        raise MitigationError(f"{method} cannot hook layer {name!r}: it is TorchScript; name another layer")
    return name


def unit_activations(classifier: Classifier, x: torch.Tensor, layer: str, batch_size: int = 256) -> torch.Tensor:
    """Activation of every unit of ``layer`` per image. Shape: N×C×H×W -> N×units (channels are
    averaged over their spatial positions)."""
    acts = classifier.activations(x, layer, batch_size=batch_size)
    return acts.flatten(2).mean(2) if acts.ndim > 2 else acts


@contextmanager
def units_off(classifier: Classifier, layer: str, units: Sequence[int] | torch.Tensor) -> Iterator[None]:
    """Zero the given units of ``layer``'s output on every forward pass inside the block (also in
    training: gradients through those units are zero, so fine-tuning cannot revive them)."""
    idx = torch.as_tensor(list(units) if not isinstance(units, torch.Tensor) else units, dtype=torch.long)

    def hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
        if len(idx) == 0:
            return output
        keep = torch.ones(output.shape[1], dtype=output.dtype, device=output.device)
        keep[idx.to(output.device)] = 0
        return output * keep.view(1, -1, *([1] * (output.ndim - 2)))

    handle = classifier._module(layer).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# -- baking ------------------------------------------------------------------------------------
class _Changes:
    """Weights changed in place, with their old values, so a failed attempt can be undone."""

    def __init__(self) -> None:
        self._saved: list[tuple[torch.Tensor, torch.Tensor]] = []

    @torch.no_grad()
    def set(self, tensor: torch.Tensor, index: tuple[slice | torch.Tensor, ...], value: float = 0.0) -> None:
        """``tensor[index] = value``, remembering the old contents."""
        self._saved.append((tensor, tensor.detach().clone()))
        tensor[index] = value

    @torch.no_grad()
    def undo(self) -> None:
        for tensor, old in reversed(self._saved):
            tensor.copy_(old)
        self._saved.clear()


@contextmanager
def _evaluating(classifier: Classifier) -> Iterator[None]:
    """Eval mode (dropout off, batch norms on their running statistics) inside the block."""
    was_training = classifier.training
    classifier.eval()
    try:
        yield
    finally:
        classifier.train(was_training)


@torch.no_grad()
def _run_order(classifier: Classifier, probe: torch.Tensor) -> list[str]:
    """Names of the network's modules in the order their forward passes finish on ``probe`` (a
    container finishes after its children; a module run twice appears twice)."""
    order: list[str] = []
    handles = []
    for name, module in classifier.network.named_modules():
        if name and not isinstance(module, torch.jit.ScriptModule):
            handles.append(module.register_forward_hook(lambda _m, _i, _o, name=name: order.append(name)))
    try:
        classifier(probe)
    finally:
        for handle in handles:
            handle.remove()
    return order


@torch.no_grad()
def _capture(classifier: Classifier, probe: torch.Tensor, name: str, *, inputs: bool = False) -> torch.Tensor:
    """The output (or, with ``inputs``, the first input) of module ``name`` on ``probe``."""
    got: list[torch.Tensor] = []

    def hook(_m: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        got.append(args[0] if inputs else out)

    handle = classifier._module(name).register_forward_hook(hook)
    try:
        classifier(probe)
    finally:
        handle.remove()
    return got[0]


def _outputs_match(got: torch.Tensor, expected: torch.Tensor) -> bool:
    return bool(torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()) + 1e-5))


def _units_are_zero(acts: torch.Tensor, idx: torch.Tensor) -> bool:
    """Whether ``idx`` of ``acts`` (N×units…) are zero, up to rounding."""
    scale = max(1.0, float(acts.abs().max()))
    return float(acts[:, idx].abs().max()) <= 1e-6 * scale


@torch.no_grad()
def _zero_at_producer(
    classifier: Classifier, layer: str, idx: torch.Tensor, probe: torch.Tensor, expected: torch.Tensor, order: list[str]
) -> str | None:
    """Zero the weights that make the units: the output rows and bias of the conv/dense module
    that last ran before the layer finished with as many outputs as the layer has units, and the
    shift (and mean) of the batch norms between them on which those units are then zero, so the
    units come out exactly 0 through ReLU-like activations and pooling. Each candidate is kept
    only if the layer's units are then zero and the model's outputs equal ``expected`` on
    ``probe``. Returns the module changed, or None (nothing changed)."""
    modules = dict(classifier.network.named_modules())
    sample = probe[:8]  # enough to tell a wrong candidate; the full probe checks the outputs
    units = int(_capture(classifier, probe[:1], layer).shape[1])
    end = order.index(layer)
    candidates: list[str] = []
    for name in reversed(order[:end]):
        m = modules[name]
        size = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features if isinstance(m, nn.Linear) else None
        if size == units and name not in candidates:
            candidates.append(name)
    if layer not in candidates and isinstance(modules[layer], (nn.Conv2d, nn.Linear)):
        candidates.insert(0, layer)  # the layer itself (before its activation)
    for name in candidates[:_MAX_CANDIDATES]:
        changes = _Changes()
        producer = modules[name]
        changes.set(producer.weight, (idx,))
        if producer.bias is not None:
            changes.set(producer.bias, (idx,))
        start = max(i for i, n in enumerate(order[:end]) if n == name) if name != layer else end
        for bn_name in dict.fromkeys(order[start + 1 : end + 1]):  # in run order, once each; the layer too
            bn = modules[bn_name]
            if not isinstance(bn, _BatchNorm) or bn.num_features != units:
                continue
            if not _units_are_zero(_capture(classifier, sample, bn_name, inputs=True), idx):
                continue  # not on the units' path
            # BN(0) = (0 - mean) / std * gamma + beta: exactly 0 with mean = beta = 0.
            if bn.running_mean is not None:
                changes.set(bn.running_mean, (idx,))
            if bn.bias is not None:
                changes.set(bn.bias, (idx,))
        if _units_are_zero(_capture(classifier, sample, layer), idx) and _outputs_match(classifier(probe), expected):
            return name
        changes.undo()
    return None


@torch.no_grad()
def _zero_at_consumer(
    classifier: Classifier, layer: str, idx: torch.Tensor, probe: torch.Tensor, expected: torch.Tensor, order: list[str]
) -> str | None:
    """Zero the input weights of the first conv/dense module after the layer that reads the units
    (directly, pooled, or flattened in any order, e.g. Keras' channels-last flatten). Which of its
    inputs carry the units is found by running the model with the layer's output replaced by
    ones on those units and zeros elsewhere. Kept only if the outputs then equal ``expected``.
    Returns the module changed, or None (nothing changed)."""
    modules = dict(classifier.network.named_modules())
    after = order[order.index(layer) + 1 :]
    consumers = [
        n
        for n in dict.fromkeys(after)
        if not n.startswith(layer + ".")
        and (isinstance(modules[n], nn.Linear) or (isinstance(modules[n], nn.Conv2d) and modules[n].groups == 1))
    ]
    sample = probe[:2]

    def fed(consumer: str, marked: bool) -> torch.Tensor:
        def swap(_m: nn.Module, _i: object, out: torch.Tensor) -> torch.Tensor:
            mark = torch.zeros_like(out)
            if marked:
                mark[:, idx] = 1
            return mark

        handle = classifier._module(layer).register_forward_hook(swap)
        try:
            return _capture(classifier, sample, consumer, inputs=True)
        finally:
            handle.remove()

    for name in consumers[:_MAX_CANDIDATES]:
        diff = (fed(name, True) - fed(name, False)).abs()
        if diff.ndim not in (2, 4):
            continue
        cols = torch.nonzero(diff.transpose(0, 1).flatten(1).amax(1) > 0).flatten()
        if len(cols) == 0:
            continue  # does not read the layer
        changes = _Changes()
        changes.set(modules[name].weight, (slice(None), cols))
        if _outputs_match(classifier(probe), expected):
            return name
        changes.undo()
    return None


def bake_pruning(classifier: Classifier, layer: str, units: Sequence[int], probe: torch.Tensor) -> str:
    """Make switching ``units`` of ``layer`` off permanent by zeroing weights, in place.

    The weights that produce the units are zeroed: the output rows and bias of the conv/dense
    module making them (found wherever it sits: the layer itself, a module nested inside it as
    in converted Keras layers, or earlier in an ``nn.Sequential`` or converted ONNX/Keras graph)
    and the shift of any batch norm in between, so each unit's output is exactly 0 through
    ReLU-like activations and pooling. Where the layer has no single producer (a residual block)
    the weights of the next layer that read the units are zeroed instead. Either way the result
    is checked on the ``probe`` images against switching the units off with a hook; the network
    is left unchanged when no way passes. Returns the name of the module whose weights changed.

    Raises:
        MitigationError: the layer's units cannot be pruned through the weights of this network.
    """
    idx = torch.as_tensor(list(units), dtype=torch.long)
    if len(idx) == 0:
        return ""
    probe = probe.to(classifier.device)
    with _evaluating(classifier), torch.no_grad():
        with units_off(classifier, layer, idx):
            expected = classifier(probe)
        order = _run_order(classifier, probe[:1])
        if layer not in order:
            raise MitigationError(f"layer {layer!r} does not run when the model classifies an image; cannot prune it")
        changed = _zero_at_producer(classifier, layer, idx, probe, expected, order)
        changed = changed or _zero_at_consumer(classifier, layer, idx, probe, expected, order)
    if changed is None:
        raise MitigationError(
            f"cannot prune units of layer {layer!r} through this network's weights (no conv or dense layer "
            "makes or reads them alone); choose another layer",
            settings=("layer",),
        )
    return changed


def check_bakeable(classifier: Classifier, layer: str, probe: torch.Tensor) -> None:
    """Check now, on a copy, that pruning units of ``layer`` can be baked into the weights (every
    other unit is pruned and checked on ``probe``), so a pruning search does not fail at its end.

    Raises:
        MitigationError: it cannot, naming the layer.
    """
    units = int(classifier.activations(probe[:1], layer).shape[1])
    trial = copy_classifier(classifier)
    bake_pruning(trial, layer, list(range(0, units, 2)), probe)
