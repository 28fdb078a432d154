"""Units of a layer: their activations, switching them off during a forward pass, and baking
that switch into the weights so a pruned model saves and reloads as an ordinary model.

A *unit* is a neuron of a dense layer or a channel of a convolutional feature map (a channel's
activation is its spatial mean, as in Fine-Pruning, Liu et al., RAID 2018, Sec. 4).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from deepdot.errors import DeepdotError
from deepdot.models import Classifier

#: Layer names the mitigations understand besides module names.
LAYER_ALIASES = ("penultimate", "last_conv")

#: Modules that map a zero unit to a zero unit and keep units apart (so a unit can be switched
#: off at the weights that produce it, further up).
_ZERO_PRESERVING = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.Tanh,
    nn.Dropout,
    nn.Dropout2d,
    nn.Identity,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
)


def resolve_layer(classifier: Classifier, layer: str) -> str:
    """The module name for ``layer``: ``penultimate`` / ``last_conv`` name the classifier's
    recorded layers; anything else must be a module name."""
    if layer == "penultimate":
        name = classifier.penultimate_layer
    elif layer == "last_conv":
        name = classifier.last_conv_layer
    else:
        name = layer
    if not name:
        raise DeepdotError(f"the model does not record its {layer.replace('_', ' ')} layer; name a layer instead")
    classifier._module(name)  # raises a one-line error for an unknown name
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


def _parent_and_siblings(network: nn.Module, name: str) -> tuple[list[nn.Module], int] | None:
    """The modules of the ``nn.Sequential`` holding ``name``, and its position there."""
    parent_name, _, child = name.rpartition(".")
    parent = network if not parent_name else dict(network.named_modules())[parent_name]
    if not isinstance(parent, nn.Sequential):
        return None
    names = [n for n, _ in parent.named_children()]
    return list(parent.children()), names.index(child)


@torch.no_grad()
def _zero_at_producer(network: nn.Module, name: str, units: torch.Tensor) -> bool:
    """Zero the weights that produce ``units``: walk back from the layer through zero-preserving
    modules and batch norms to the conv/dense layer that makes the units. False if there is none."""
    found = _parent_and_siblings(network, name)
    if found is None:
        return False
    modules, pos = found
    batch_norms: list[nn.modules.batchnorm._BatchNorm] = []
    for module in reversed(modules[: pos + 1]):
        if isinstance(module, _ZERO_PRESERVING):
            continue
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            batch_norms.append(module)
            continue
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.weight[units] = 0
            if module.bias is not None:
                module.bias[units] = 0
            for bn in batch_norms:
                # BN(0) = beta - gamma * mean / std: zero with gamma = beta = 0.
                if bn.weight is not None:
                    bn.weight[units] = 0
                    bn.bias[units] = 0
                else:
                    return False
            return True
        return False
    return False


@torch.no_grad()
def _zero_at_consumer(network: nn.Module, name: str, units: torch.Tensor, channels: int, spatial: int) -> bool:
    """Zero the input weights of the first dense/conv layer after ``name`` that reads its units
    (directly, after global pooling, or flattened channel by channel). False if there is none."""
    after = False
    for module_name, module in network.named_modules():
        if module_name == name:
            after = True
            continue
        if not after or module_name.startswith(name + "."):
            continue
        if isinstance(module, nn.Linear):
            if module.in_features == channels:
                module.weight[:, units] = 0
                return True
            if module.in_features == channels * spatial:
                cols = (units.view(-1, 1) * spatial + torch.arange(spatial).view(1, -1)).flatten()
                module.weight[:, cols] = 0
                return True
            return False
        if isinstance(module, nn.Conv2d):
            if module.in_channels == channels and module.groups == 1:
                module.weight[:, units] = 0
                return True
            return False
    return False


def bake_pruning(classifier: Classifier, layer: str, units: Sequence[int], probe: torch.Tensor) -> None:
    """Make switching ``units`` of ``layer`` off permanent by zeroing weights, in place.

    The producing conv/dense layer's weights and biases for those units are zeroed (through any
    ReLU, pooling or batch norm after it); where the layer has no single producer (a residual
    block) the next layer's weights that read the units are zeroed instead. The result is checked
    against switching the units off with a hook on ``probe`` images.

    Raises:
        DeepdotError: the layer's units cannot be pruned through the weights of this network.
    """
    idx = torch.as_tensor(list(units), dtype=torch.long)
    if len(idx) == 0:
        return
    with torch.no_grad(), units_off(classifier, layer, idx):
        expected = classifier(probe)
    acts = classifier.activations(probe[:1], layer)
    channels = acts.shape[1]
    spatial = int(acts[0, 0].numel())
    network = classifier.network
    if not _zero_at_producer(network, layer, idx) and not _zero_at_consumer(network, layer, idx, channels, spatial):
        raise DeepdotError(
            f"cannot prune units of layer {layer!r} through this network's weights; choose another layer"
        )
    with torch.no_grad():
        got = classifier(probe)
    if not torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()) + 1e-5):
        raise DeepdotError(f"pruning layer {layer!r} through the weights does not match switching its units off")
