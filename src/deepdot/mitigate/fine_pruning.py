"""Fine-tuning and fine-pruning (Liu, Dolan-Gavitt and Garg, *Fine-Pruning*, RAID 2018).

Backdoor behaviour tends to live in channels that clean inputs leave dormant. Fine-pruning
switches off last-convolutional-layer channels in increasing order of their mean activation on
clean data until clean accuracy has dropped by a set margin (4 % in the paper), then fine-tunes
the pruned model on clean data to win the accuracy back. Fine-tuning alone is the weaker baseline
the paper compares with. Neither needs the recovered trigger; it is only used to draw the curve.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deepdot.data import ImageData
from deepdot.mitigate.base import Mitigation, MitigationError, RecoveredBackdoor, Repaired, check_budget
from deepdot.mitigate.guard import train_within_budget
from deepdot.mitigate.layers import unit_activations
from deepdot.mitigate.search import Curve, PruningSearch
from deepdot.models import Classifier
from deepdot.progress import ProgressFn
from deepdot.training import TrainConfig


@dataclass(frozen=True, kw_only=True)
class FineTuning(Mitigation):
    """Fine-tune on clean data only (Fine-Pruning, Sec. 4.2).

    The learning rate is higher than a model's usual final one on purpose: fine-tuning at a
    small rate barely moves the weights and leaves the backdoor in place (on ``digits``, Adam at
    1e-3 for 2 epochs kept attack success at 0.9; 5e-3 for 5 epochs brings fine-pruning to < 0.1).

    That rate can also wreck a model (on the GTSRB replica, 5 epochs at 5e-3 took clean accuracy
    from 97 % to 55 %), so training runs under the accuracy budget
    (:func:`~deepdot.mitigate.guard.train_within_budget`): it keeps the best epoch whose clean
    accuracy on a held-out share of the clean data stayed within ``accuracy_budget``, stops once
    the recovered trigger fails there, and tries lower rates when ``lr`` got nowhere. The
    recovered trigger is only measured, never trained on.

    Args:
        epochs: most passes over the clean data per learning rate tried.
        lr: Adam learning rate (the first one tried).
        accuracy_budget: the most clean accuracy an epoch may cost to be kept (0.01 = one point).
        target_attack_success: stop once the recovered trigger succeeds on at most this share of
            the held-out share.
        check_fraction: share of the clean data held out (not trained on) to judge epochs.
        lr_factors: the learning rates tried in turn, as multiples of ``lr``.
        batch_size: images per step.
        seed: batch order and the held-out share.
    """

    method = "fine-tune"

    epochs: int = 5
    lr: float = 5e-3
    accuracy_budget: float = 0.01
    target_attack_success: float = 0.01
    check_fraction: float = 0.1
    lr_factors: tuple[float, ...] = (1.0, 0.25, 0.0625)
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise MitigationError("fine-tuning needs epochs >= 1, batch size >= 1 and a positive learning rate")
        if not 0 <= self.target_attack_success < 1 or not 0 < self.check_fraction < 1:
            raise MitigationError("fine-tuning needs target_attack_success in [0, 1) and check_fraction in (0, 1)")
        check_budget(self.accuracy_budget, self.lr_factors)

    def config(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, seed=self.seed)

    def _run(
        self,
        classifier: Classifier,
        backdoors: tuple[RecoveredBackdoor, ...],
        clean_data: ImageData,
        progress: ProgressFn,
    ) -> Repaired:
        train_part, check = clean_data.split(self.check_fraction, seed=self.seed)
        guarded = train_within_budget(
            classifier,
            train_part,
            check,
            self.config(),
            backdoors,
            max_accuracy_drop=self.accuracy_budget,
            target_attack_success=self.target_attack_success,
            lr_factors=self.lr_factors,
            progress=progress,
        )
        return Repaired(classifier, training_loss=guarded.loss, fine_tuning=guarded)


@dataclass(frozen=True, kw_only=True)
class FinePruning(PruningSearch):
    """Prune dormant last-conv channels until clean accuracy drops by ``max_accuracy_drop``, then
    fine-tune (Fine-Pruning, Sec. 4.3).

    Args:
        layer: ``last_conv`` (the paper's choice) or a module name.
        max_accuracy_drop: keep pruning while clean accuracy stays within this of the unpruned
            model's (0.04 in the paper); the fine-tuning is meant to win it back.
        accuracy_budget: what the *fine-tuned* model may cost at most, against the unpruned
            model, on a held-out share of the clean data: the fine-tuning keeps its best epoch
            within it, and tries lower rates when ``lr`` got nowhere
            (:func:`~deepdot.mitigate.guard.train_within_budget`).
        lr_factors: the learning rates tried in turn, as multiples of ``lr``.
        max_fraction: never prune more than this share of the channels.
        step_fraction: share of the channels pruned per step (at least one).
        fine_tune_epochs / lr / batch_size: the fine-tuning that follows (0 epochs: pruning only).
        max_images: rank and measure on at most this many clean images (speed).
        seed: image choice and batch order.
    """

    method = "fine-prune"

    layer: str = "last_conv"
    max_accuracy_drop: float = 0.04
    accuracy_budget: float = 0.01
    lr_factors: tuple[float, ...] = (1.0, 0.25, 0.0625)
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
        self._check_search("fine-pruning")

    def _rank(
        self, classifier: Classifier, layer: str, data: ImageData, backdoors: tuple[RecoveredBackdoor, ...]
    ) -> torch.Tensor:
        """Increasing mean activation on clean inputs: dormant channels first (the trigger is not used)."""
        return torch.argsort(unit_activations(classifier, data.x, layer).mean(0), stable=True)

    def _floor(self, curve: Curve) -> float:
        """The lowest clean accuracy within the margin of the unpruned model's."""
        return curve[0].clean_accuracy - self.max_accuracy_drop

    def _stop(self, curve: Curve) -> bool:
        """Once clean accuracy has left the margin."""
        return curve[-1].clean_accuracy < self._floor(curve)

    def _keep(self, curve: Curve) -> int:
        """The last step that kept accuracy within the margin."""
        return [p for p in curve if p.clean_accuracy >= self._floor(curve)][-1].pruned
