"""What every trigger-reverse-engineering scanner shares: input checks, the clean-accuracy
sanity check, label order, reuse of labels already done (resume), and the outlier test."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from deepdot.data import ImageData
from deepdot.errors import DeepdotError
from deepdot.metrics import clean_accuracy
from deepdot.models import Classifier
from deepdot.progress import ProgressFn, no_progress
from deepdot.scan.outliers import DEFAULT_THRESHOLD, outlier_test
from deepdot.scan.result import LabelTrigger, ScanResult

LabelDone = Callable[[LabelTrigger], None]


class PreprocessingMismatch(DeepdotError):
    """The model classifies the scan's clean data too poorly for a scan to mean anything."""


@contextmanager
def frozen_weights(classifier: Classifier) -> Iterator[None]:
    """Eval mode and no weight gradients while optimising triggers (only the trigger learns)."""
    flags = [p.requires_grad for p in classifier.parameters()]
    was_training = classifier.training
    classifier.eval()
    for p in classifier.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(classifier.parameters(), flags, strict=True):
            p.requires_grad_(f)
        classifier.train(was_training)


def check_clean_accuracy(classifier: Classifier, data: ImageData, minimum: float, sample: int = 2000) -> float:
    """Clean accuracy on (up to ``sample`` of) the data; below ``minimum`` raise
    :class:`PreprocessingMismatch` naming the likely cause."""
    acc = clean_accuracy(classifier, data.take(sample, seed=0))
    if acc < minimum:
        raise PreprocessingMismatch(
            f"the model classifies only {acc:.1%} of {data.name} correctly (minimum {minimum:.0%}): a scan would be "
            f"meaningless. The usual cause is a preprocessing mismatch: the model uses preprocess "
            f"'{classifier.preprocess}'; try raw, unit, imagenet or inception (or check that the data and the "
            f"model's labels match), or lower the minimum accuracy.",
            settings=("preprocess", "min_clean_accuracy"),
        )
    return acc


CROSS_ENTROPY, REFERENCE_CODE = "cross-entropy", "reference-code"
LOSSES = (CROSS_ENTROPY, REFERENCE_CODE)
_KERAS_EPSILON = 1e-7


def trigger_loss(logits: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-image loss of stamped images (N×classes logits) towards ``target`` (N labels).

    ``cross-entropy`` is the paper's objective. ``reference-code`` is what the Neural Cleanse
    reference code computes: Keras ``categorical_crossentropy(output, y_true)`` with its two
    arguments swapped, i.e. the one-hot label (clipped to [1e-7, 1 - 1e-7]) scored against the
    model's probabilities, which equals ``-log(1e-7) · (1 - p_target) ≈ 16.12 · (1 - p_target)``
    up to a 1e-7 term. It is bounded and flat where the trigger already works; offered so that
    the reference's numbers can be reproduced exactly.
    """
    if kind == CROSS_ENTROPY:
        return F.cross_entropy(logits, target, reduction="none")
    if kind == REFERENCE_CODE:
        p_target = torch.softmax(logits, 1).gather(1, target[:, None])[:, 0]
        return -(p_target * math.log(1 - _KERAS_EPSILON) + (1 - p_target) * math.log(_KERAS_EPSILON))
    raise DeepdotError(f"unknown loss {kind!r}; choose {' or '.join(LOSSES)}")


#: below this many clean images, or this many per label, a verdict is flagged as shaky
SHAKY_IMAGES, SHAKY_PER_LABEL = 200, 5


def small_data_warnings(data: ImageData, num_classes: int) -> tuple[str, ...]:
    """Why a scan on ``data`` may be unreliable (empty when the data is ample)."""
    found = []
    if len(data) < SHAKY_IMAGES:
        found.append(f"only {len(data)} clean images (fewer than {SHAKY_IMAGES}): the verdict may be shaky")
    per_label = torch.bincount(data.y, minlength=num_classes)
    thin = int((per_label < SHAKY_PER_LABEL).sum())
    if thin:
        found.append(
            f"{thin} of {num_classes} labels have fewer than {SHAKY_PER_LABEL} clean images: the accuracy check "
            "cannot tell whether the model knows them"
        )
    return tuple(found)


@dataclass(frozen=True, kw_only=True)
class TriggerScanner:
    """Base of the Neural Cleanse scanners. Subclasses implement :meth:`_reverse`.

    Common settings:
        attack_success_threshold: a trigger counts once it sends this share of images to the label.
        loss: the objective's classification term: ``cross-entropy`` (the paper's) or
            ``reference-code`` (what the reference code computes, see :func:`trigger_loss`).
        min_images: fewest clean images a scan accepts. With a handful of images any small
            trigger fools "99 %" of them and the accuracy check means nothing: a scan of one
            image called a backdoored model clean. Below :data:`SHAKY_IMAGES` (or fewer than
            :data:`SHAKY_PER_LABEL` per label) the result carries a warning.
        anomaly_threshold: anomaly index above which a label is flagged (Neural Cleanse: 2).
        min_clean_accuracy: sanity check before scanning (see :func:`check_clean_accuracy`).
        seed: makes every label's initialisation and batches repeatable (independent of order).
    """

    attack_success_threshold: float = 0.99
    min_images: int = 50
    loss: str = CROSS_ENTROPY
    anomaly_threshold: float = DEFAULT_THRESHOLD
    min_clean_accuracy: float = 0.5
    seed: int = 0

    mode = "base"
    #: whether a label's result is independent of the other labels scanned with it, so that the
    #: labels an interrupted scan finished can be combined with labels scanned afresh
    labels_independent: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.min_images < 1:
            raise DeepdotError(f"min_images must be at least 1, got {self.min_images}")
        if self.loss not in LOSSES:
            raise DeepdotError(f"unknown loss {self.loss!r}; choose {' or '.join(LOSSES)}")

    def settings(self) -> dict:
        return {"mode": self.mode, **asdict(self)}

    def reusable(self, done: Mapping[int, LabelTrigger], labels: Iterable[int]) -> dict[int, LabelTrigger]:
        """The labels of ``done`` (e.g. from a checkpoint) that a scan of ``labels`` may reuse.

        All of them when labels are scanned independently; otherwise only a complete set: a
        scanner that optimises labels jointly would give the labels it scans afresh other
        results than in the joint run, and the verdict could change.
        """
        wanted = set(labels)
        kept = {v: item for v, item in done.items() if v in wanted}
        if not self.labels_independent and set(kept) != wanted:
            return {}
        return kept

    def scan(
        self,
        classifier: Classifier,
        data: ImageData,
        *,
        labels: Sequence[int] | None = None,
        suspected: Sequence[int] = (),
        done: Mapping[int, LabelTrigger] | None = None,
        on_label: LabelDone | None = None,
        progress: ProgressFn = no_progress,
    ) -> ScanResult:
        """Reverse-engineer a minimal trigger for every label and run the MAD outlier test.

        Args:
            classifier: the model under test.
            data: clean images (labels are used only for the sanity check).
            labels: the candidate target labels (default: all).
            suspected: labels to scan first (order only; no effect on the result).
            done: labels already reverse-engineered (e.g. from a checkpoint): reused, not rerun,
                as far as :meth:`reusable` allows.
            on_label: called with each newly finished label (the CLI checkpoints there).
            progress: progress callback.
        """
        if data.image_shape != classifier.input_shape:
            raise DeepdotError(
                f"{data.name}: images are {'x'.join(map(str, data.image_shape))} but the model takes "
                f"{'x'.join(map(str, classifier.input_shape))}"
            )
        k = classifier.num_classes
        chosen = list(range(k)) if labels is None else sorted({int(v) for v in labels})
        bad = [v for v in [*chosen, *suspected] if not 0 <= v < k]
        if bad:
            raise DeepdotError(f"labels {bad} are outside the model's 0..{k - 1}")
        if len(chosen) < 3:
            raise DeepdotError("the outlier test needs at least 3 labels to scan")
        if len(data) < self.min_images:
            raise DeepdotError(
                f"{data.name}: only {len(data)} clean image(s); a scan needs at least {self.min_images} for its verdict "
                f"to mean anything (a few hundred, from every label, is better)"
            )
        warnings = small_data_warnings(data, k)
        accuracy = check_clean_accuracy(classifier, data, self.min_clean_accuracy)
        order = [v for v in suspected if v in chosen] + [v for v in chosen if v not in suspected]
        previous = self.reusable(done or {}, chosen)
        todo = [v for v in order if v not in previous]
        start, cpu_start = time.perf_counter(), time.process_time()
        found: dict[int, LabelTrigger] = {v: previous[v] for v in order if v in previous}
        with frozen_weights(classifier):
            for item in self._reverse(classifier, data.x, todo, progress):
                found[item.label] = item
                if on_label is not None:
                    on_label(item)
        results = tuple(found[v] for v in order)
        stats = outlier_test({t.label: t.mask_l1 for t in results}, threshold=self.anomaly_threshold)
        return ScanResult(
            labels=results,
            outliers=stats,
            clean_accuracy=accuracy,
            seconds=sum(t.seconds for t in results if t.label in previous) + time.perf_counter() - start,
            image_passes=sum(t.image_passes for t in results),
            mode=self.mode,
            settings=self.settings(),
            cpu_seconds=sum(t.cpu_seconds for t in results if t.label in previous) + time.process_time() - cpu_start,
            warnings=warnings,
        )

    def _reverse(
        self, classifier: Classifier, x: torch.Tensor, labels: list[int], progress: ProgressFn
    ) -> Iterable[LabelTrigger]:
        raise NotImplementedError


def label_generator(seed: int, label: int) -> torch.Generator:
    """A random stream per (seed, label), so a label's result does not depend on scan order."""
    return torch.Generator().manual_seed(seed * 1_000_003 + label)


EPSILON = 1e-7  # Keras' K.epsilon(), used by the reference to keep arctanh finite


def to_tanh_space(v: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`from_tanh_space` for values in [0, 1]."""
    return torch.atanh((v - 0.5) * (2 - EPSILON))


def from_tanh_space(t: torch.Tensor) -> torch.Tensor:
    """``tanh(t) / (2 - eps) + 0.5``: an unconstrained variable mapped into (0, 1)."""
    return torch.tanh(t) / (2 - EPSILON) + 0.5
