"""Fine-tuning and fine-pruning (Liu, Dolan-Gavitt and Garg, *Fine-Pruning*, RAID 2018).

Backdoor behaviour tends to live in channels that clean inputs leave dormant. Fine-pruning
switches off last-convolutional-layer channels in increasing order of their mean activation on
clean data until clean accuracy has dropped by a set margin (4 % in the paper), then fine-tunes
the pruned model on clean data to win the accuracy back. Fine-tuning alone is the weaker baseline
the paper compares with. Neither needs the recovered trigger; it is only used to draw the curve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from deepdot.data import ImageData
from deepdot.mitigate.base import Mitigation, MitigationError, RecoveredBackdoor, check_pruning_search
from deepdot.mitigate.layers import bake_pruning, check_bakeable, resolve_layer, unit_activations
from deepdot.mitigate.prune import fine_tune_pruned, prune_until
from deepdot.mitigate.result import MitigationResult, PruningOutcome
from deepdot.models import Classifier
from deepdot.progress import ProgressFn
from deepdot.training import TrainConfig, train


@dataclass(frozen=True, kw_only=True)
class FineTuning(Mitigation):
    """Fine-tune on clean data only (Fine-Pruning, Sec. 4.2).

    The learning rate is higher than a model's usual final one on purpose: fine-tuning at a
    small rate barely moves the weights and leaves the backdoor in place (on ``digits``, Adam at
    1e-3 for 2 epochs kept attack success at 0.9; 5e-3 for 5 epochs brings fine-pruning to < 0.1).

    Args:
        epochs: passes over the clean data.
        lr: Adam learning rate.
        batch_size: images per step.
        seed: batch order.
    """

    method = "fine-tune"

    epochs: int = 5
    lr: float = 5e-3
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise MitigationError("fine-tuning needs epochs >= 1, batch size >= 1 and a positive learning rate")

    def config(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, seed=self.seed)

    def _run(
        self,
        classifier: Classifier,
        backdoors: tuple[RecoveredBackdoor, ...],
        clean_data: ImageData,
        progress: ProgressFn,
    ) -> MitigationResult:
        history = train(classifier, clean_data, self.config(), progress=progress)
        return MitigationResult(
            method=self.method,
            classifier=classifier,
            targets=(),
            settings={},
            seconds=0.0,
            training_loss=tuple(history.loss),
        )


@dataclass(frozen=True, kw_only=True)
class FinePruning(Mitigation):
    """Prune dormant last-conv channels until clean accuracy drops by ``max_accuracy_drop``, then
    fine-tune (Fine-Pruning, Sec. 4.3).

    Args:
        layer: ``last_conv`` (the paper's choice) or a module name.
        max_accuracy_drop: keep pruning while clean accuracy stays within this of the unpruned
            model's (0.04 in the paper).
        max_fraction: never prune more than this share of the channels.
        step_fraction: share of the channels pruned per step (at least one).
        fine_tune_epochs / lr / batch_size: the fine-tuning that follows (0 epochs: pruning only).
        max_images: rank and measure on at most this many clean images (speed).
        seed: image choice and batch order.
    """

    method = "fine-prune"

    layer: str = "last_conv"
    max_accuracy_drop: float = 0.04
    max_fraction: float = 0.95
    step_fraction: float = 0.01
    fine_tune_epochs: int = 5
    lr: float = 5e-3
    batch_size: int = 32
    max_images: int = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.max_accuracy_drop < 1:
            raise MitigationError(f"max_accuracy_drop must be in [0, 1), got {self.max_accuracy_drop}")
        check_pruning_search(
            "fine-pruning",
            max_fraction=self.max_fraction,
            step_fraction=self.step_fraction,
            fine_tune_epochs=self.fine_tune_epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            max_images=self.max_images,
        )

    def check(self, classifier: Classifier, clean_data: ImageData) -> None:
        """The layer resolves, can be hooked, and its pruning can be baked into the weights (tried
        on a copy with half its units, on the images the search will use)."""
        layer = resolve_layer(classifier, self.layer, self.method)
        check_bakeable(classifier, layer, clean_data.take(self.max_images, seed=self.seed).x[:64])

    def _run(
        self,
        classifier: Classifier,
        backdoors: tuple[RecoveredBackdoor, ...],
        clean_data: ImageData,
        progress: ProgressFn,
    ) -> MitigationResult:
        layer = resolve_layer(classifier, self.layer, self.method)
        data = clean_data.take(self.max_images, seed=self.seed)
        # Increasing mean activation on clean inputs: dormant channels first.
        order = torch.argsort(unit_activations(classifier, data.x, layer).mean(0), stable=True)
        units = len(order)
        _, curve = prune_until(
            classifier,
            layer,
            order,
            data,
            backdoors,
            step=max(1, math.floor(self.step_fraction * units)),
            max_units=max(1, math.floor(self.max_fraction * units)),
            stop=lambda first, point: point.clean_accuracy < first.clean_accuracy - self.max_accuracy_drop,
            progress=progress,
            stage="fine-prune",
        )
        # The last step that kept accuracy within the margin.
        within = [p for p in curve if p.clean_accuracy >= curve[0].clean_accuracy - self.max_accuracy_drop]
        pruned = tuple(int(u) for u in order[: within[-1].pruned])
        loss: tuple[float, ...] = ()
        if self.fine_tune_epochs:
            config = TrainConfig(epochs=self.fine_tune_epochs, batch_size=self.batch_size, lr=self.lr, seed=self.seed)
            loss = fine_tune_pruned(classifier, layer, pruned, clean_data, config, progress)
        bake_pruning(classifier, layer, pruned, data.x[:64])
        return MitigationResult(
            method=self.method,
            classifier=classifier,
            targets=(),
            settings={},
            seconds=0.0,
            pruning=PruningOutcome(layer=layer, units=units, pruned_units=pruned, curve=curve),
            training_loss=loss,
        )
