"""Fine-tuning that cannot ship a model it broke.

Every mitigation that trains (unlearning, fine-tuning, and the fine-tuning after a pruning
search) trains through :func:`train_within_budget`: after each epoch an :class:`EpochGuard`
measures clean accuracy and the recovered triggers' success on a *check* part of the clean data
that is not trained on, remembers the weights of the best epoch whose accuracy stayed within the
budget, and stops once the triggers fail within it. When the first learning rate never got
there, training starts again from the same weights at a lower rate. At the end the model holds
the best weights seen within the budget -- the untouched starting weights if no epoch stayed
within it -- so an over-eager learning rate costs time, never the model.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import replace

from deepdot.data import ImageData
from deepdot.metrics import clean_accuracy
from deepdot.mitigate.base import MitigationError, RecoveredBackdoor, recovered_success
from deepdot.mitigate.result import GuardedTraining, GuardPoint
from deepdot.models import Classifier
from deepdot.progress import ProgressFn
from deepdot.training import BatchTransform, TrainConfig, train


class EpochGuard:
    """Watches a model being fine-tuned and keeps its best weights within an accuracy budget.

    "Best" is the lowest recovered attack success among the epochs whose clean accuracy on
    ``check`` is at most ``max_accuracy_drop`` below ``reference_accuracy`` (default: the
    starting model's; ties: the earlier), or one image of ``check`` when that is more (the
    budget is then judged again on held-out data by :class:`~deepdot.mitigate.pipeline.RepairBudget`). The starting weights are the first candidate, so by
    default the kept weights are never outside the budget; when they are (a pruned model measured
    against the unpruned one's accuracy) and no epoch gets back within it, the most accurate
    weights seen are kept. Calling the guard after an epoch returns True when training may stop:
    the recovered triggers succeed on at most ``target_attack_success`` of ``check`` within the
    budget.
    """

    def __init__(
        self,
        classifier: Classifier,
        check: ImageData,
        backdoors: Sequence[RecoveredBackdoor],
        *,
        max_accuracy_drop: float,
        target_attack_success: float,
        harden: float | None = None,
        reference_accuracy: float | None = None,
    ) -> None:
        self.classifier = classifier
        self.check = check
        self.backdoors = tuple(backdoors)
        self.target_attack_success = target_attack_success
        self.harden = harden
        self.lr = 0.0
        self.points: list[GuardPoint] = []
        first = self._measure(0)
        reference = first.clean_accuracy if reference_accuracy is None else reference_accuracy
        # the check part cannot see less than one image: a smaller budget would reject every
        # epoch that misclassifies one more image (on 20 images, five points)
        self.floor = reference - max(max_accuracy_drop, 1 / max(1, len(check))) - 1e-12
        self._best = first
        self._best_state = copy.deepcopy(classifier.state_dict())

    def within(self, point: GuardPoint) -> bool:
        """Whether ``point`` kept clean accuracy within the budget."""
        return point.clean_accuracy >= self.floor

    def _measure(self, epochs: int) -> GuardPoint:
        point = GuardPoint(
            epochs,
            self.lr,
            clean_accuracy(self.classifier, self.check),
            recovered_success(self.classifier, self.check, self.backdoors, self.harden),
        )
        self.points.append(point)
        return point

    def _rank(self, point: GuardPoint) -> tuple[bool, float]:
        """Larger is better: within the budget first; then, within it, less recovered attack
        success, and outside it, more clean accuracy."""
        if self.within(point):
            return (True, -point.attack_success_rate)
        return (False, point.clean_accuracy)

    def __call__(self, epochs: int) -> bool:
        point = self._measure(epochs)
        if self._rank(point) > self._rank(self._best):  # strictly better: ties keep the earlier
            self._best = point
            self._best_state = copy.deepcopy(self.classifier.state_dict())
        return self.done

    @property
    def done(self) -> bool:
        """Whether the kept weights already remove the recovered triggers within the budget."""
        return self.within(self._best) and self._best.attack_success_rate <= self.target_attack_success

    @property
    def best(self) -> GuardPoint:
        return self._best

    def restore(self) -> GuardPoint:
        """Load the kept weights into the model; returns their figures."""
        self.classifier.load_state_dict(self._best_state)
        self.classifier.eval()
        return self._best


def train_within_budget(
    classifier: Classifier,
    train_part: ImageData,
    check: ImageData,
    config: TrainConfig,
    backdoors: Sequence[RecoveredBackdoor],
    *,
    max_accuracy_drop: float,
    target_attack_success: float,
    lr_factors: Sequence[float] = (1.0, 0.25),
    harden: float | None = None,
    reference_accuracy: float | None = None,
    batch_transform: BatchTransform | None = None,
    progress: ProgressFn,
) -> GuardedTraining:
    """Fine-tune ``classifier`` in place on ``train_part`` under an :class:`EpochGuard` watching
    ``check`` (clean images not trained on; see :meth:`ImageData.split`); try the learning rates ``config.lr * f`` for ``f`` in ``lr_factors`` in
    turn (each from the starting weights) until one removes the recovered triggers within the
    budget, as long as the last rate lost more accuracy than the budget allows in some epoch (a
    rate that stayed within it but did not remove the triggers is not retried lower). The model
    ends with the guard's kept weights. ``reference_accuracy``: the accuracy the
    budget is counted from, when it is not the starting model's (see :class:`EpochGuard`).

    Raises:
        MitigationError: no learning-rate factor, or one that is not positive.
    """
    if not lr_factors or any(f <= 0 for f in lr_factors):
        raise MitigationError("fine-tuning needs at least one learning-rate factor, all positive")
    guard = EpochGuard(
        classifier,
        check,
        backdoors,
        max_accuracy_drop=max_accuracy_drop,
        target_attack_success=target_attack_success,
        harden=harden,
        reference_accuracy=reference_accuracy,
    )
    start = copy.deepcopy(classifier.state_dict())
    loss: list[float] = []
    first = 0  # the guard's first point of the current rate
    for attempt, factor in enumerate(lr_factors):
        # done, or the last rate was not too high: a lower one would not do better
        if guard.done or attempt and all(guard.within(p) for p in guard.points[first:]):
            break
        if attempt:
            classifier.load_state_dict(start)
        first = len(guard.points)
        guard.lr = config.lr * factor
        history = train(
            classifier,
            train_part,
            replace(config, lr=guard.lr),
            batch_transform=batch_transform,
            after_epoch=guard,
            progress=progress,
        )
        loss.extend(history.loss)
        if not guard.done:  # ``train`` asks the guard after every epoch but the last
            guard(len(history.loss))
    kept = guard.restore()
    return GuardedTraining(tuple(loss), tuple(guard.points), kept, guard.within(kept))
