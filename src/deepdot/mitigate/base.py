"""What every mitigation shares: the recovered backdoors it works against, the one public entry
point :meth:`Mitigation.apply`, and helpers to stamp recovered triggers onto clean batches.

The defender only has clean data and the triggers a scan recovered (Neural Cleanse, Wang et al.,
IEEE S&P 2019, Sec. VI): nothing here ever touches poisoned training data.
"""

from __future__ import annotations

import copy
import io
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass, is_dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from deepdot.data import ImageData
from deepdot.errors import DeepdotError
from deepdot.metrics import attack_success_rate
from deepdot.mitigate.result import GuardedTraining, MitigationResult, PruningOutcome
from deepdot.models import Classifier
from deepdot.progress import ProgressFn, no_progress
from deepdot.results import Backdoor, LabelTrigger, ScanResult

if TYPE_CHECKING:
    from deepdot.mitigate.filter import TriggerFilter


class MitigationError(DeepdotError):
    """A mitigation cannot run with these settings, this model or this data."""


def check_pruning_search(
    method: str,
    *,
    max_fraction: float,
    step_fraction: float,
    fine_tune_epochs: int,
    batch_size: int,
    lr: float,
    max_images: int,
) -> None:
    """Validate the settings shared by the pruning searches (``prune`` and ``fine-prune``)."""
    if not 0 < max_fraction <= 1 or not 0 < step_fraction <= 1:
        raise MitigationError("max_fraction and step_fraction must be in (0, 1]")
    if fine_tune_epochs < 0 or batch_size < 1 or lr <= 0:
        raise MitigationError(f"{method} needs fine_tune_epochs >= 0, batch size >= 1 and a positive learning rate")
    if max_images < 10:
        raise MitigationError(f"max_images must be at least 10, got {max_images}")


def check_budget(accuracy_budget: float, lr_factors: Sequence[float] = (1.0,)) -> None:
    """Validate the accuracy budget and learning-rate factors every training mitigation has."""
    if not 0 <= accuracy_budget < 1:
        raise MitigationError(f"the accuracy budget must be in [0, 1), got {accuracy_budget}")
    if not lr_factors or any(f <= 0 for f in lr_factors):
        raise MitigationError(f"lr_factors must be positive numbers, got {list(lr_factors)}")


#: a trigger recovered by a scan and the label it sends images to (the one :class:`Backdoor` value)
RecoveredBackdoor = Backdoor


BackdoorSource = ScanResult | LabelTrigger | RecoveredBackdoor | Sequence[LabelTrigger | RecoveredBackdoor]
"""What a mitigation accepts as "the backdoor": a whole scan (its flagged labels are used), one
label's recovered trigger, or several of them."""


def recovered_backdoors(source: BackdoorSource) -> tuple[RecoveredBackdoor, ...]:
    """The backdoors a mitigation works against, from a scan result or recovered triggers.

    Raises:
        MitigationError: a scan that flagged no label (there is nothing to mitigate).
    """
    if isinstance(source, ScanResult):
        if not source.flagged:
            raise MitigationError("the scan flagged no label: there is no recovered trigger to mitigate")
        return tuple(RecoveredBackdoor(label, source.trigger_for(label)) for label in source.flagged)
    if isinstance(source, LabelTrigger):
        return (RecoveredBackdoor(source.label, source.trigger),)
    if isinstance(source, RecoveredBackdoor):
        return (source,)
    items = tuple(recovered_backdoors(s)[0] for s in source)
    if not items:
        raise MitigationError("no recovered trigger given")
    return items


def with_hardened(backdoors: Sequence[RecoveredBackdoor], threshold: float | None) -> tuple[RecoveredBackdoor, ...]:
    """``backdoors`` followed by each one's hardened trigger (:meth:`Trigger.hardened` at
    ``threshold``: full strength where the mask is at least that); ``None``: ``backdoors`` alone."""
    if threshold is None:
        return tuple(backdoors)
    return (*backdoors, *(RecoveredBackdoor(b.target, b.trigger.hardened(threshold)) for b in backdoors))


def recovered_success(
    classifier: Classifier, data: ImageData, backdoors: Sequence[RecoveredBackdoor], harden: float | None = None
) -> float:
    """Highest attack success rate of the recovered triggers on ``data``; with ``harden``, also of
    each trigger stamped at full strength where its mask is at least ``harden``
    (:meth:`Trigger.hardened`)."""
    return max(attack_success_rate(classifier, data, b.trigger, b.target) for b in with_hardened(backdoors, harden))


def stamp_random(
    x: torch.Tensor, backdoors: Sequence[RecoveredBackdoor], fraction: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stamp a recovered trigger onto about ``fraction`` of the images (a random backdoor each).

    Returns the new batch and a boolean mask of the stamped images. Shape: N×C×H×W -> same, (N,).
    """
    chosen = torch.rand(len(x), generator=generator) < fraction
    which = torch.randint(0, len(backdoors), (len(x),), generator=generator)
    out = x.clone()
    for k, backdoor in enumerate(backdoors):
        sel = chosen & (which == k)
        if sel.any():
            out[sel] = backdoor.trigger.apply(x[sel])
    return out, chosen


def triggered_images(data: ImageData, backdoor: RecoveredBackdoor) -> torch.Tensor:
    """The images of ``data`` not of the target label, with the trigger stamped on (N'×C×H×W)."""
    keep = data.y != backdoor.target
    return backdoor.trigger.apply(data.x[keep])


def copy_classifier(classifier: Classifier) -> Classifier:
    """A deep copy of ``classifier`` whose weights can be trained.

    ``copy.deepcopy`` of a TorchScript module gives parameters that are not leaves of the autograd
    graph (an optimizer refuses them), so TorchScript parts are copied by saving and loading them.
    """
    memo: dict[int, Any] = {}
    scripted: set[str] = set()
    for name, module in classifier.named_modules():
        if not isinstance(module, torch.jit.ScriptModule) or any(name.startswith(f"{s}.") for s in scripted):
            continue
        scripted.add(name)
        buffer = io.BytesIO()
        torch.jit.save(module, buffer)
        buffer.seek(0)
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
        memo[id(module)] = torch.jit.load(buffer, map_location=device)
    return copy.deepcopy(classifier, memo)


@dataclass(frozen=True)
class Repaired:
    """What :meth:`Mitigation._run` produced: the model to use from now on and the facts about
    how it got there; :meth:`Mitigation.apply` turns it into the :class:`MitigationResult`.

    Attributes:
        classifier: the repaired model (the private copy ``_run`` was given, changed in place),
            or for a mitigation that leaves the model alone the very model it was given.
        pruning: for pruning methods, what was pruned and the pruning curve.
        input_filter: for the input filter, the calibrated filter.
        training_loss: per-epoch loss of any fine-tuning.
        fine_tuning: how that fine-tuning went under the accuracy budget.
    """

    classifier: Classifier
    pruning: PruningOutcome | None = None
    input_filter: TriggerFilter | None = None
    training_loss: tuple[float, ...] = ()
    fine_tuning: GuardedTraining | None = None


class Mitigation(ABC):
    """Base of every mitigation: settings live on the (frozen, keyword-only) dataclass, the model,
    the recovered backdoor and the clean data come with :meth:`apply`.

    Subclasses implement :meth:`_run` (and :meth:`check` where a model may not suit them);
    :meth:`apply` validates the inputs, deep-copies the classifier unless the mitigation leaves
    it alone (:attr:`changes_model`; the caller's model is never changed), times the run and
    builds the :class:`MitigationResult` from what :meth:`_run` returns.
    """

    #: the name used by ``deepdot mitigate --method`` and in ``mitigation.json``
    method: str = "mitigation"

    #: whether :meth:`_run` changes the model's weights: if so it is given a private copy (in eval
    #: mode), otherwise the caller's model itself, which it must not change
    changes_model: ClassVar[bool] = True

    def apply(
        self,
        classifier: Classifier,
        backdoor: BackdoorSource,
        clean_data: ImageData,
        *,
        progress: ProgressFn = no_progress,
    ) -> MitigationResult:
        """Repair a copy of ``classifier`` against the recovered ``backdoor`` using ``clean_data``.

        Args:
            classifier: the suspect model (not modified; a mitigation that leaves the model alone,
                the input filter, returns this very object as the result's ``classifier``).
            backdoor: a :class:`~deepdot.results.ScanResult` (its flagged labels), or recovered
                triggers with their target labels.
            clean_data: clean images with their true labels (the defender's data).
            progress: called with :class:`~deepdot.progress.ProgressEvent` during long steps.
        """
        backdoors = recovered_backdoors(backdoor)
        if clean_data.image_shape != classifier.input_shape:
            raise MitigationError(
                f"{clean_data.name}: images are {clean_data.image_shape} but the model takes {classifier.input_shape}"
            )
        for b in backdoors:
            if b.trigger.mask.shape != clean_data.x.shape[-2:]:
                raise MitigationError(f"the trigger for label {b.target} does not fit {clean_data.image_shape} images")
            if not 0 <= b.target < classifier.num_classes:
                raise MitigationError(f"label {b.target} is outside the model's 0..{classifier.num_classes - 1}")
        self.check(classifier, clean_data)
        model = classifier
        if self.changes_model:
            model = copy_classifier(classifier)
            model.eval()
        start = time.perf_counter()
        repaired = self._run(model, backdoors, clean_data, progress)
        return MitigationResult(
            method=self.method,
            classifier=repaired.classifier,
            targets=tuple(b.target for b in backdoors),
            settings=self.settings(),
            seconds=time.perf_counter() - start,
            pruning=repaired.pruning,
            input_filter=repaired.input_filter,
            training_loss=repaired.training_loss,
            fine_tuning=repaired.fine_tuning,
        )

    def check(self, classifier: Classifier, clean_data: ImageData) -> None:
        """Raise :class:`MitigationError` now if this mitigation cannot run on ``classifier`` (e.g.
        its layers cannot be hooked, or a pruning cannot be baked into its weights): a quick test,
        made before any long work. :meth:`apply` makes it too. Nothing to check by default."""
        return None

    @abstractmethod
    def _run(
        self,
        classifier: Classifier,
        backdoors: tuple[RecoveredBackdoor, ...],
        clean_data: ImageData,
        progress: ProgressFn,
    ) -> Repaired:
        """Repair ``classifier`` (a private copy when :attr:`changes_model`, else the caller's
        model, to be left unchanged) and return the model with what was done to it."""

    def settings(self) -> dict[str, Any]:
        """The algorithm's settings, for reports."""
        return asdict(self) if is_dataclass(self) else {}  # type: ignore[arg-type]
