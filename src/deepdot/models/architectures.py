"""Built-in classifier architectures.

Every builder returns a plain ``nn.Module`` mapping *preprocessed* input (N×C×H×W) to logits.
Layers are named so that mitigation code can address them: each architecture records which
named module is its last convolutional layer and which is its second-to-last (penultimate)
layer in :data:`ARCHITECTURES`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True, kw_only=True)
class Architecture:
    """A registered architecture: how to build it and what it expects."""

    name: str
    description: str
    build: Callable[..., nn.Module]
    input_shape: tuple[int, int, int]
    num_classes: int
    preprocess: str | dict[str, list[float]]
    #: Named module whose output is the last convolutional feature map (after its ReLU).
    last_conv_layer: str
    #: Named module whose output feeds the final (logit) layer.
    penultimate_layer: str


def _conv_relu(name: str, cin: int, cout: int, kernel: int, padding: int) -> list[tuple[str, nn.Module]]:
    return [
        (name, nn.Conv2d(cin, cout, kernel, padding=padding)),
        (f"{name}_relu", nn.ReLU()),
    ]


def nc_mnist(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """Neural Cleanse's MNIST network: 2 conv (16, 32 filters, 5×5) + 2 dense (512, classes).

    Shape: input N×1×28×28, output N×num_classes.
    """
    layers: list[tuple[str, nn.Module]] = []
    layers += _conv_relu("conv1", in_channels, 16, 5, 0)
    layers.append(("pool1", nn.MaxPool2d(2)))
    layers += _conv_relu("conv2", 16, 32, 5, 0)
    layers.append(("pool2", nn.MaxPool2d(2)))
    layers += [
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(32 * 4 * 4, 512)),
        ("fc1_relu", nn.ReLU()),
        ("fc2", nn.Linear(512, num_classes)),
    ]
    return nn.Sequential(OrderedDict(layers))


def nc_gtsrb(num_classes: int = 43, base: int = 32, dense: int = 512, in_channels: int = 3) -> nn.Module:
    """Neural Cleanse's GTSRB network (the seeds' injection code): 6 conv + 2 dense.

    Three blocks of [conv 3×3 'same', conv 3×3 'valid', max-pool 2, dropout 0.2] with
    base, 2·base and 4·base filters, then dense(512) + dropout 0.5 + dense(classes).
    Shape: input N×3×32×32, output N×num_classes.
    """
    layers: list[tuple[str, nn.Module]] = []
    cin = in_channels
    conv = 1
    for block, width in enumerate((base, base * 2, base * 4), start=1):
        layers += _conv_relu(f"conv{conv}", cin, width, 3, 1)
        layers += _conv_relu(f"conv{conv + 1}", width, width, 3, 0)
        layers.append((f"pool{block}", nn.MaxPool2d(2)))
        layers.append((f"drop{block}", nn.Dropout(0.2)))
        cin = width
        conv += 2
    layers += [
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(base * 4 * 2 * 2, dense)),
        ("fc1_relu", nn.ReLU()),
        ("drop4", nn.Dropout(0.5)),
        ("fc2", nn.Linear(dense, num_classes)),
    ]
    return nn.Sequential(OrderedDict(layers))


def digits_net(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """A small CNN for the built-in 16×16 ``digits`` set: 2 conv (16, 32) + 2 dense (64, classes)."""
    layers: list[tuple[str, nn.Module]] = []
    layers += _conv_relu("conv1", in_channels, 16, 3, 1)
    layers.append(("pool1", nn.MaxPool2d(2)))
    layers += _conv_relu("conv2", 16, 32, 3, 1)
    layers.append(("pool2", nn.MaxPool2d(2)))
    layers += [
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(32 * 4 * 4, 64)),
        ("fc1_relu", nn.ReLU()),
        ("fc2", nn.Linear(64, num_classes)),
    ]
    return nn.Sequential(OrderedDict(layers))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """Compact CIFAR-style residual network (He et al. 2016, §4.2): 6n+2 layers, widths 16/32/64.

    ``depth=20`` is ResNet-20. The last block's output (``stage3``) is the last convolutional
    feature map; ``flatten`` (after global average pooling) feeds the logit layer ``fc``.
    """

    def __init__(self, num_classes: int = 10, depth: int = 20, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        stages = []
        cin = 16
        for i, width in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                blocks.append(_BasicBlock(cin, width, stride=2 if (i > 0 and j == 0) else 1))
                cin = width
            stages.append(nn.Sequential(*blocks))
        self.stage1, self.stage2, self.stage3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.fc(self.flatten(self.pool(x)))


def resnet(num_classes: int = 10, depth: int = 20, in_channels: int = 3) -> nn.Module:
    return ResNetCifar(num_classes=num_classes, depth=depth, in_channels=in_channels)


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture(
            name="digits_net",
            description="small CNN for the built-in 16x16 digits set (2 conv + 2 dense)",
            build=digits_net,
            input_shape=(1, 16, 16),
            num_classes=10,
            preprocess="unit",
            last_conv_layer="conv2_relu",
            penultimate_layer="fc1_relu",
        ),
        Architecture(
            name="nc_mnist",
            description="Neural Cleanse's MNIST net (2 conv + 2 dense), 1x28x28",
            build=nc_mnist,
            input_shape=(1, 28, 28),
            num_classes=10,
            preprocess="unit",
            last_conv_layer="conv2_relu",
            penultimate_layer="fc1_relu",
        ),
        Architecture(
            name="nc_gtsrb",
            description="Neural Cleanse's GTSRB net (6 conv + 2 dense), 3x32x32",
            build=nc_gtsrb,
            input_shape=(3, 32, 32),
            num_classes=43,
            preprocess="raw",
            last_conv_layer="conv6_relu",
            penultimate_layer="fc1_relu",
        ),
        Architecture(
            name="resnet20",
            description="ResNet-20 with batch norm for CIFAR-10 (3x32x32)",
            build=resnet,
            input_shape=(3, 32, 32),
            num_classes=10,
            preprocess={"mean": [0.4914, 0.4822, 0.4465], "std": [0.2470, 0.2435, 0.2616]},
            last_conv_layer="stage3",
            penultimate_layer="flatten",
        ),
    )
}
