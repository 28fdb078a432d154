"""Neuron pruning (Neural Cleanse, Wang et al., IEEE S&P 2019, Sec. VI-B).

Units of a layer are ranked by how much the recovered trigger raises their mean activation and
switched off in that order until the recovered trigger stops working. The paper prunes the
second-to-last layer and finds the last convolutional layer better (BadNets models: attack
success < 1 % with at most 8 % of the channels pruned and < 0.8 % accuracy lost). The search
itself is :class:`~deepdot.mitigate.search.PruningSearch`, shared with fine-pruning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deepdot.data import ImageData
from deepdot.mitigate.base import MitigationError, RecoveredBackdoor, with_hardened
from deepdot.mitigate.ranking import rank_by_trigger
from deepdot.mitigate.result import PruningStep
from deepdot.mitigate.search import Curve, PruningSearch
from deepdot.mitigate.search import measure_point as measure_point
from deepdot.models import Classifier


@dataclass(frozen=True, kw_only=True)
class NeuronPruning(PruningSearch):
    """Prune the units the recovered trigger excites most until it stops working.

    Args:
        layer: ``last_conv`` (channels; the paper's better choice), ``penultimate`` (neurons) or
            a module name.
        target_attack_success: stop once the recovered trigger's attack success rate on the clean
            data, net of the model's own errors into the target (``net_of_errors``), is at or
            below this. 0.1 % by default: the scan recovers the *smallest soft* trigger that
            works, which fails well before the attacker's full-strength one, so "fails on all
            but one image in a thousand" is the signal. On the GTSRB replica the recovered
            trigger (soft and hardened) was at 1.0 % after 27 last-conv channels (planted
            trigger: 2.1 %) and at 0 after 31 (planted 0.41 %, accuracy −0.88 points;
            benchmarks/RESULTS.md).
        max_accuracy_drop: once the recovered trigger fails, pruning goes on in the same order
            while clean accuracy on the clean data stays within this of the unpruned model's,
            and keeps the last such step: the next units in the ranking are the ones the trigger
            excites next most, a margin against the attacker's stronger trigger. ``None``: stop
            as soon as the recovered trigger fails (the paper's rule). Half a point by default:
            on the GTSRB replica the test set lost about twice what the 2,000 clean images
            showed (a 1-point budget cost 1.2 points on the test set).
        net_of_errors: judge the recovered trigger by its success *net of* the share of the same
            images the model already sends to the target without it
            (:attr:`PruningStep.net_attack_success_rate`). The gross success never falls below
            the model's own errors into the target label, so on a model that makes many, a
            small ``target_attack_success`` would otherwise never be reached.
        harden_threshold: rank and stop on the recovered trigger *and* its hardened form
            (:meth:`Trigger.hardened`: full strength wherever the mask is at least this): units
            are ranked by the larger of the two activation gaps, and the trigger counts as
            failed only when both fail. ``None``: the recovered trigger alone. On the GTSRB
            replica, stopping at 1 %, the soft trigger failed at 27 channels (planted 2.1 %),
            the hardened one at 28 (1.2 %; benchmarks/RESULTS.md).
        accuracy_budget: the most clean accuracy the pruning may cost, on the clean data, ever
            (0.01 = one point; ``deepdot mitigate --max-accuracy-drop``): the search stops when a
            step leaves it, and when the recovered trigger never failed within it, the step with
            the least recovered attack success within it is kept (possibly none).
        lr_factors: the learning rates tried in turn by any fine-tuning, as multiples of ``lr``.
        max_fraction: never prune more than this share of the layer.
        step_fraction: share of the layer pruned per step (at least one unit).
        fine_tune_epochs: after pruning, fine-tune this many epochs on the clean data with the
            pruned units held off, to win back clean accuracy (0: the paper's pruning alone).
        lr / batch_size: of that fine-tuning.
        max_images: rank and measure on at most this many clean images (speed).
        seed: which images when there are more; batch order.
    """

    method = "prune"

    layer: str = "last_conv"
    target_attack_success: float = 0.001
    max_accuracy_drop: float | None = 0.005
    accuracy_budget: float = 0.01
    lr_factors: tuple[float, ...] = (1.0, 0.25)
    net_of_errors: bool = True
    harden_threshold: float | None = 0.1
    max_fraction: float = 0.5
    step_fraction: float = 0.01
    fine_tune_epochs: int = 0
    lr: float = 1e-3
    batch_size: int = 32
    max_images: int = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.target_attack_success < 1:
            raise MitigationError(f"target_attack_success must be in [0, 1), got {self.target_attack_success}")
        if self.max_accuracy_drop is not None and not 0 <= self.max_accuracy_drop < 1:
            raise MitigationError(f"max_accuracy_drop must be in [0, 1), got {self.max_accuracy_drop}")
        self._check_search("pruning")

    def _checked(self, backdoors: tuple[RecoveredBackdoor, ...]) -> tuple[RecoveredBackdoor, ...]:
        """The recovered triggers and, with ``harden_threshold``, their hardened forms."""
        return with_hardened(backdoors, self.harden_threshold)

    def _rank(
        self, classifier: Classifier, layer: str, data: ImageData, backdoors: tuple[RecoveredBackdoor, ...]
    ) -> torch.Tensor:
        """Decreasing activation gap between triggered and clean images: what the trigger excites most first."""
        return rank_by_trigger(classifier, layer, backdoors, data)

    def _success(self, point: PruningStep) -> float:
        return point.net_attack_success_rate if self.net_of_errors else point.attack_success_rate

    def _failed(self, curve: Curve) -> PruningStep | None:
        """The first pruned point at which the recovered trigger(s) failed, if any."""
        return next((p for p in curve[1:] if self._success(p) <= self.target_attack_success), None)

    def _within(self, curve: Curve) -> list[PruningStep]:
        """The points of ``curve`` within the accuracy budget (the unpruned point always is)."""
        return [p for p in curve if p.clean_accuracy >= curve[0].clean_accuracy - self.accuracy_budget - 1e-12]

    def _stop(self, curve: Curve) -> bool:
        """When a step leaves the budget; or once the trigger has failed: at once (no accuracy
        margin), else when accuracy leaves the margin."""
        if curve[-1].clean_accuracy < curve[0].clean_accuracy - self.accuracy_budget - 1e-12:
            return True
        if self._failed(curve) is None:
            return False
        return (
            self.max_accuracy_drop is None
            or curve[-1].clean_accuracy < curve[0].clean_accuracy - self.max_accuracy_drop
        )

    def _keep(self, curve: Curve) -> int:
        """Within the budget: the last step from the failure on that kept accuracy within the
        margin (the failure itself if none did); if the trigger never failed within the budget,
        the step with the least recovered success (the earliest of equals)."""
        within = self._within(curve)
        failed = self._failed(within)
        if failed is None:
            return min(within, key=lambda p: (self._success(p), p.pruned)).pruned
        if self.max_accuracy_drop is None:
            return failed.pruned
        floor = curve[0].clean_accuracy - self.max_accuracy_drop
        margin = [p for p in within if p.pruned >= failed.pruned and p.clean_accuracy >= floor]
        return margin[-1].pruned if margin else failed.pruned
