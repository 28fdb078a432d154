"""The supervised training loop used to build clean and backdoored models."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from deepdot.data import ImageData
from deepdot.errors import DeepdotError
from deepdot.models import Classifier
from deepdot.progress import ProgressEvent, ProgressFn, no_progress

BatchTransform = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""``(x, y, index) -> (x, y)`` applied to every training batch after augmentation (poisoning)."""


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Settings of :func:`train`. Adam with optional step decay; seeds make runs repeatable."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    #: multiply the learning rate by 0.1 at these fractions of training (e.g. (0.5, 0.75))
    lr_milestones: tuple[float, ...] = ()
    #: random crop (pad 4) + horizontal flip, as usual for CIFAR-10
    augment: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise DeepdotError("training needs epochs >= 1, batch size >= 1 and a positive learning rate")


@dataclass(frozen=True)
class TrainHistory:
    """Per-epoch training loss and accuracy, and the wall time."""

    loss: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    seconds: float = 0.0


def augment_batch(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop with ``pad`` reflect padding and random horizontal flip, per image."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    out = torch.empty_like(x)
    for i in range(n):
        crop = padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out


def train(
    classifier: Classifier,
    data: ImageData,
    config: TrainConfig | None = None,
    *,
    batch_transform: BatchTransform | None = None,
    after_epoch: Callable[[int], bool] | None = None,
    progress: ProgressFn = no_progress,
) -> TrainHistory:
    """Train ``classifier`` in place on ``data`` with cross-entropy.

    ``batch_transform`` sees each batch after augmentation, with the batch's indices into
    ``data``: BadNets uses it to stamp the trigger onto the poisoned images and relabel them.
    ``after_epoch(epochs_done)`` runs after every epoch but the last, with the model in eval mode;
    training stops early when it returns True (the history then holds only the epochs run).
    """
    config = config or TrainConfig()
    if data.image_shape != classifier.input_shape:
        raise DeepdotError(f"{data.name}: images are {data.image_shape} but the model takes {classifier.input_shape}")
    torch.manual_seed(config.seed)
    g = torch.Generator().manual_seed(config.seed)
    opt = torch.optim.Adam(classifier.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = (len(data) + config.batch_size - 1) // config.batch_size
    total = config.epochs * steps_per_epoch
    milestones = sorted(int(m * total) for m in config.lr_milestones)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1) if milestones else None
    history = TrainHistory()
    start = time.perf_counter()
    step = 0
    device = classifier.device
    classifier.train()
    try:
        for epoch in range(config.epochs):
            perm = torch.randperm(len(data), generator=g)
            loss_sum, correct, seen = 0.0, 0, 0
            for b in range(steps_per_epoch):
                idx = perm[b * config.batch_size : (b + 1) * config.batch_size]
                x, y = data.x[idx], data.y[idx]
                if config.augment:
                    x = augment_batch(x, g)
                if batch_transform is not None:
                    x, y = batch_transform(x, y, idx)
                x, y = x.to(device), y.to(device)
                logits = classifier(x)
                loss = F.cross_entropy(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
                step += 1
                loss_sum += loss.item() * len(y)
                correct += int((logits.argmax(1) == y).sum())
                seen += len(y)
                progress(
                    ProgressEvent(
                        "train", step, total, {"epoch": epoch + 1, "epochs": config.epochs, "loss": loss_sum / seen}
                    )
                )
            history.loss.append(loss_sum / seen)
            history.accuracy.append(correct / seen)
            if after_epoch is not None and epoch + 1 < config.epochs:
                classifier.eval()
                if after_epoch(epoch + 1):
                    break
                classifier.train()
    finally:
        classifier.eval()
    return TrainHistory(history.loss, history.accuracy, time.perf_counter() - start)
