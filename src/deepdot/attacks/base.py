"""What every attack shares: the result it returns and the interface the command line, the zoo
and the benchmarks use (:class:`Attack`).

An attack is a frozen, keyword-only settings dataclass (like :class:`~deepdot.attacks.BadNets`)
whose :meth:`Attack.run` trains a classifier *in place* into a backdoored one and measures it.
Nothing here reads or writes files: the command line saves the model, the trigger and
``attack.json`` (:meth:`AttackResult.to_dict`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from deepdot.data import ImageData
from deepdot.metrics import ALL_TO_ALL
from deepdot.models import Classifier
from deepdot.progress import ProgressFn
from deepdot.training import TrainConfig, TrainHistory
from deepdot.triggers import Trigger


@dataclass(frozen=True)
class AttackResult:
    """What an attack produced, measured on held-out test data.

    Attributes:
        clean_accuracy: of the backdoored model on the test data.
        attack_success_rate: of the full trigger on test images not of the target label.
        target: the attacker's label (or :data:`~deepdot.metrics.ALL_TO_ALL`).
        poisoned_images: training images stamped and relabelled (-1 when a fresh share of every
            batch is poisoned).
        history: the training run.
        trigger: the trigger the attack planted, when the attack made it (Trojan, Xiong et
            al.); ``None`` when it was given in the settings (BadNets).
        facts: the method's own facts for ``attack.json`` (e.g. ``sampling_rate``,
            ``augmented_images``, ``pruned_channels``), JSON-ready values.
    """

    clean_accuracy: float
    attack_success_rate: float
    target: int
    poisoned_images: int
    history: TrainHistory
    trigger: Trigger | None = None
    facts: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "clean_accuracy": self.clean_accuracy,
            "attack_success_rate": self.attack_success_rate,
            "target": self.target,
            "all_to_all": self.target == ALL_TO_ALL,
            "poisoned_images": self.poisoned_images,
            "train_seconds": round(self.history.seconds, 2),
            "train_loss": self.history.loss,
            **self.facts,
        }


class Attack(Protocol):
    """The interface of every attack's settings object.

    ``method`` is its name on the command line (``deepdot attack --method``) and in
    ``attack.json``; ``target`` the attacker's label.
    """

    method: str
    target: int

    def run(
        self,
        classifier: Classifier,
        train_data: ImageData,
        test_data: ImageData,
        config: TrainConfig | None = None,
        *,
        progress: ProgressFn = ...,
    ) -> AttackResult:
        """Train ``classifier`` in place into a backdoored model on ``train_data``; measure it on
        ``test_data``. The planted trigger is the settings' ``trigger`` or ``result.trigger``."""
        ...
