"""The pruning search shared by neuron pruning (Neural Cleanse, Sec. VI-B) and fine-pruning
(Liu et al., RAID 2018, Sec. 4.3).

Both rank the units of one layer, switch them off in that order a step at a time while drawing
the curve of clean accuracy and recovered attack success, stop by a rule, keep some prefix of the
ranking, optionally fine-tune with the kept units held off, and bake the pruning into the weights.
:class:`PruningSearch` is that procedure; a subclass says only how units are ranked
(:meth:`~PruningSearch._rank`), when to stop (:meth:`~PruningSearch._stop`) and how many units to
keep pruned (:meth:`~PruningSearch._keep`).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Callable, Sequence

import torch

from deepdot.data import ImageData
from deepdot.metrics import attack_success_rate, clean_accuracy
from deepdot.mitigate.base import Mitigation, RecoveredBackdoor, Repaired, check_budget, check_pruning_search
from deepdot.mitigate.guard import train_within_budget
from deepdot.mitigate.layers import bake_pruning, check_bakeable, resolve_layer, units_off
from deepdot.mitigate.result import GuardedTraining, PruningOutcome, PruningStep
from deepdot.models import Classifier
from deepdot.progress import ProgressEvent, ProgressFn, no_progress
from deepdot.training import TrainConfig

#: a pruning curve so far: the unpruned point first, then one point per step
Curve = Sequence[PruningStep]


def measure_point(
    classifier: Classifier, data: ImageData, backdoors: Sequence[RecoveredBackdoor], pruned: int, units: int
) -> PruningStep:
    """One point of a pruning curve: clean accuracy and the recovered triggers' attack success on
    ``data``, gross and net of the model's own errors into each target label (one clean pass
    serves both clean figures)."""
    pred = classifier.predict(data.x)
    success, net = [], []
    for b in backdoors:
        others = data.y != b.target
        rate = attack_success_rate(classifier, data, b.trigger, b.target)
        # in whole images, so that a trigger that adds nothing nets exactly 0
        hits = round(rate * int(others.sum())) - int((pred[others] == b.target).sum())
        success.append(rate)
        net.append(hits / max(1, int(others.sum())))
    return PruningStep(
        pruned,
        pruned / units if units else 0.0,
        float((pred == data.y).float().mean()),
        max(success),
        max(net),
    )


def prune_until(
    classifier: Classifier,
    layer: str,
    order: torch.Tensor,
    data: ImageData,
    backdoors: Sequence[RecoveredBackdoor],
    *,
    step: int,
    max_units: int,
    stop: Callable[[Curve], bool],
    progress: ProgressFn,
    stage: str,
) -> tuple[PruningStep, ...]:
    """Switch units off in ``order``, ``step`` at a time, measuring clean accuracy and recovered
    attack success on ``data`` after each step, until ``stop(curve)`` holds or ``max_units`` are
    off (``stop`` is asked after each step, never about the unpruned point alone). Returns the
    curve; the model is left as it was.
    """
    units = len(order)
    curve = [measure_point(classifier, data, backdoors, 0, units)]
    total = math.ceil(max_units / step)
    for i, n in enumerate(range(step, max_units + step, step)):
        n = min(n, max_units)
        with units_off(classifier, layer, order[:n]):
            point = measure_point(classifier, data, backdoors, n, units)
        curve.append(point)
        progress(ProgressEvent(stage, i + 1, total, {"pruned": n, "attack_success_rate": point.attack_success_rate}))
        if stop(curve):
            break
    return tuple(curve)


#: the fine-tuning after a pruning search may stop once the recovered triggers succeed on at most
#: this share of the held-out images
FINE_TUNE_TARGET = 0.01

#: share of the clean data held out from the fine-tuning after a pruning search, to judge its epochs
CHECK_FRACTION = 0.1


def fine_tune_pruned(
    classifier: Classifier,
    layer: str,
    pruned: Sequence[int],
    clean_data: ImageData,
    config: TrainConfig,
    backdoors: Sequence[RecoveredBackdoor],
    *,
    accuracy_budget: float,
    lr_factors: Sequence[float],
    target_attack_success: float,
    progress: ProgressFn = no_progress,
) -> GuardedTraining:
    """Fine-tune on clean data with the ``pruned`` units of ``layer`` held off (their gradients
    are zero, so they stay dead; Fine-Pruning, Sec. 4.3), under the accuracy budget counted from
    the *unpruned* model (:func:`~deepdot.mitigate.guard.train_within_budget`)."""
    train_part, check = clean_data.split(CHECK_FRACTION, seed=config.seed)
    reference = clean_accuracy(classifier, check)
    with units_off(classifier, layer, pruned):
        return train_within_budget(
            classifier,
            train_part,
            check,
            config,
            backdoors,
            max_accuracy_drop=accuracy_budget,
            target_attack_success=target_attack_success,
            lr_factors=lr_factors,
            reference_accuracy=reference,
            progress=progress,
        )


class PruningSearch(Mitigation):
    """Base of the mitigations that prune a layer's units in a ranked order.

    The subclass is a frozen dataclass holding the settings read here (``layer``,
    ``max_fraction``, ``step_fraction``, ``fine_tune_epochs``, ``lr``, ``accuracy_budget``,
    ``lr_factors``, ``batch_size``, ``max_images``, ``seed``) and implements :meth:`_rank`, :meth:`_stop` and :meth:`_keep` (and
    :meth:`_checked` to measure with other backdoors than the recovered ones). The search ranks and
    measures on at most ``max_images`` clean images and reports progress as stage :attr:`method`.
    """

    layer: str
    max_fraction: float
    step_fraction: float
    fine_tune_epochs: int
    lr: float
    accuracy_budget: float
    lr_factors: tuple[float, ...]
    batch_size: int
    max_images: int
    seed: int

    def _check_search(self, name: str) -> None:
        """Validate the shared settings (``name``: the search's name in error messages)."""
        check_pruning_search(
            name,
            max_fraction=self.max_fraction,
            step_fraction=self.step_fraction,
            fine_tune_epochs=self.fine_tune_epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            max_images=self.max_images,
        )
        check_budget(self.accuracy_budget, self.lr_factors)

    def check(self, classifier: Classifier, clean_data: ImageData) -> None:
        """The layer resolves, can be hooked, and its pruning can be baked into the weights (tried
        on a copy with half its units, on the images the search will use)."""
        layer = resolve_layer(classifier, self.layer, self.method)
        check_bakeable(classifier, layer, clean_data.take(self.max_images, seed=self.seed).x[:64])

    def _checked(self, backdoors: tuple[RecoveredBackdoor, ...]) -> tuple[RecoveredBackdoor, ...]:
        """The backdoors the curve is measured with (and :meth:`_rank` is given): the recovered
        ones by default."""
        return backdoors

    @abstractmethod
    def _rank(
        self, classifier: Classifier, layer: str, data: ImageData, backdoors: tuple[RecoveredBackdoor, ...]
    ) -> torch.Tensor:
        """The units of ``layer`` in pruning order, first pruned first. Shape: (units,), int64."""

    @abstractmethod
    def _stop(self, curve: Curve) -> bool:
        """Whether to stop after the last point of ``curve`` (``curve[0]`` is the unpruned model)."""

    @abstractmethod
    def _keep(self, curve: Curve) -> int:
        """How many units, from the start of the ranking, stay pruned once the search has drawn
        ``curve`` (one of its points' ``pruned``)."""

    def _run(
        self,
        classifier: Classifier,
        backdoors: tuple[RecoveredBackdoor, ...],
        clean_data: ImageData,
        progress: ProgressFn,
    ) -> Repaired:
        layer = resolve_layer(classifier, self.layer, self.method)
        data = clean_data.take(self.max_images, seed=self.seed)
        checked = self._checked(backdoors)
        order = self._rank(classifier, layer, data, checked)
        units = len(order)
        curve = prune_until(
            classifier,
            layer,
            order,
            data,
            checked,
            step=max(1, math.floor(self.step_fraction * units)),
            max_units=max(1, math.floor(self.max_fraction * units)),
            stop=self._stop,
            progress=progress,
            stage=self.method,
        )
        pruned = tuple(int(u) for u in order[: self._keep(curve)])
        guarded = None
        if self.fine_tune_epochs:
            config = TrainConfig(epochs=self.fine_tune_epochs, batch_size=self.batch_size, lr=self.lr, seed=self.seed)
            guarded = fine_tune_pruned(
                classifier,
                layer,
                pruned,
                clean_data,
                config,
                checked,
                accuracy_budget=self.accuracy_budget,
                lr_factors=self.lr_factors,
                target_attack_success=FINE_TUNE_TARGET,
                progress=progress,
            )
        bake_pruning(classifier, layer, pruned, data.x[:64])
        return Repaired(
            classifier,
            pruning=PruningOutcome(layer=layer, units=units, pruned_units=pruned, curve=curve),
            training_loss=guarded.loss if guarded else (),
            fine_tuning=guarded,
        )
