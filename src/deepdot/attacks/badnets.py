"""BadNets (Gu et al. 2017): poison a fraction of the training set with a trigger and the
attacker's label, then train as usual. Neural Cleanse's injection code does the same with a
4×4 white square and target 33 on GTSRB."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deepdot.attacks.base import AttackResult
from deepdot.data import ImageData
from deepdot.errors import DeepdotError
from deepdot.metrics import ALL_TO_ALL, attack_success_rate, attack_targets, clean_accuracy
from deepdot.models import Classifier
from deepdot.progress import ProgressFn, no_progress
from deepdot.training import TrainConfig, train
from deepdot.triggers import Trigger


@dataclass(frozen=True, kw_only=True)
class BadNets:
    """BadNets poisoning settings.

    Args:
        trigger: the trigger stamped onto poisoned images.
        target: attacker's label (all-to-one), or :data:`~deepdot.metrics.ALL_TO_ALL` for y -> y+1.
        poison_rate: fraction of training images that are poisoned (stamped and relabelled).
        resample: if False (BadNets), one fixed set of images is poisoned; if True (the Neural
            Cleanse injection code), every batch poisons a fresh random ``poison_rate`` share, so
            the trigger is seen on many more different images over training.
        seed: chooses which images are poisoned.
    """

    method = "badnets"

    trigger: Trigger
    target: int
    poison_rate: float = 0.1
    resample: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.poison_rate < 1.0:
            raise DeepdotError(f"poison rate must be in (0, 1), got {self.poison_rate}")

    def poisoned_flags(self, data: ImageData) -> torch.Tensor:
        """Boolean (N,) marking the training images to poison. All-to-one draws them from
        images whose label is not already the target."""
        if self.target != ALL_TO_ALL and not 0 <= self.target < data.num_classes:
            raise DeepdotError(f"target label {self.target} is outside 0..{data.num_classes - 1}")
        if data.image_shape[1:] != tuple(self.trigger.mask.shape):
            raise DeepdotError(
                f"trigger is {tuple(self.trigger.mask.shape)} but {data.name} images are {data.image_shape[1:]}"
            )
        eligible = torch.ones(len(data), dtype=torch.bool) if self.target == ALL_TO_ALL else data.y != self.target
        candidates = torch.nonzero(eligible).flatten()
        g = torch.Generator().manual_seed(self.seed)
        n = int(round(self.poison_rate * len(data)))
        chosen = candidates[torch.randperm(len(candidates), generator=g)[:n]]
        flags = torch.zeros(len(data), dtype=torch.bool)
        flags[chosen] = True
        return flags

    def run(
        self,
        classifier: Classifier,
        train_data: ImageData,
        test_data: ImageData,
        config: TrainConfig | None = None,
        *,
        progress: ProgressFn = no_progress,
    ) -> AttackResult:
        """Train ``classifier`` in place on poisoned ``train_data``; measure on ``test_data``."""
        flags = self.poisoned_flags(train_data)
        k = train_data.num_classes
        g = torch.Generator().manual_seed(self.seed + 1)

        def poison(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if self.resample:
                hit = torch.rand(len(idx), generator=g) < self.poison_rate
                if self.target != ALL_TO_ALL:
                    hit &= y != self.target
            else:
                hit = flags[idx]
            if hit.any():
                x = x.clone()
                y = y.clone()
                x[hit] = self.trigger.apply(x[hit])
                y[hit] = attack_targets(y[hit], self.target, k)
            return x, y

        history = train(classifier, train_data, config or TrainConfig(), batch_transform=poison, progress=progress)
        return AttackResult(
            clean_accuracy=clean_accuracy(classifier, test_data),
            attack_success_rate=attack_success_rate(classifier, test_data, self.trigger, self.target),
            target=self.target,
            poisoned_images=int(flags.sum()) if not self.resample else -1,
            history=history,
        )
