"""Xiong et al.'s two backdoors made to escape Neural Cleanse ("Escaping Backdoor Attack Detection
of Deep Learning", IFIP SEC 2020): :class:`XiongReconstructed` (their Algorithm 1) and
:class:`XiongRandom` (Algorithm 2).

Both poison ``Sp`` training images with the full trigger (relabelled to the target) and
*noise-augment* ``Sn`` others: each gets the trigger through a random sub-mask keeping each mask
pixel with probability α (``sampling_rate``) and keeps its label. The model learns that part of
the trigger means nothing, so the smallest trigger Neural Cleanse can reverse-engineer for the
target stays about as large as the planted one instead of shrinking to a few salient pixels.
Algorithm 1's trigger is the target's trigger reverse-engineered on a *clean* model (so it looks
like every other label's); Algorithm 2's is ``z`` random pixels with random values.

How deepdot reads the paper (its Eq. 1 and 2 and Algorithm 1's listing are not in the text we
have; what follows rests on the prose and Algorithm 2's inputs):

* **Sp, Sn and the rest are disjoint.** Algorithm 2 takes "Sp ⊆ S, Sn ⊆ S, Sc: the rest clean
  data set" and Algorithm 1 adds noise to "clean training data which haven't been poisoned in
  the previous step". MNIST's "all training set for data argumentation" is therefore every image
  not poisoned (54 000 of 60 000, Sc empty), so ``augment_fraction`` is a share of the images
  left after poisoning, and Sp + Sn always fit. Poisoned images are drawn from images not of the
  target label; augmented ones from all the others (the target's included).
* **One sub-mask per image, drawn once.** "For each image img belonging to S, first we generate
  a subset of mask with the sampling rate α", and the manipulated training set is built before
  training ("after the above two steps, the training data is divided into three parts ... we
  train the model on these data"): each augmented image's sub-mask is drawn once (seeded) and
  the same one is stamped every epoch, not resampled.
* **Sub-mask of a soft mask.** Each pixel is kept *at its own mask value* with probability α
  (independently, so a binary mask of z pixels keeps Binomial(z, α) of them) and zeroed
  otherwise: ``mask' = mask ⊙ b, b ~ Bernoulli(α)``. Neural Cleanse's reconstructed mask is
  soft and positive nearly everywhere; scaling the kept values is not in the paper.
* **Algorithm 2's pattern** "is set randomly from 0 to 255": whole values 0..255 scaled to
  [0, 1], over the whole image; the paper writes its shape m × n (grey MNIST), colour images
  get an independent value per channel.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any, ClassVar, TypeVar

import torch

from deepdot.attacks.base import AttackResult
from deepdot.data import ImageData
from deepdot.errors import DeepdotError
from deepdot.metrics import attack_success_rate, clean_accuracy
from deepdot.models import Classifier
from deepdot.progress import ProgressEvent, ProgressFn, no_progress
from deepdot.scan import FastNeuralCleanse
from deepdot.scan.base import TriggerScanner
from deepdot.training import BatchTransform, TrainConfig, train
from deepdot.triggers import Trigger

_A = TypeVar("_A", bound="_NoiseAugmented")
# the paper's GTSRB figures: Sp 1 960 and Sn 10 000 of Neural Cleanse's 39 209 training images
_GTSRB = {"target": 33, "poison_fraction": 1_960 / 39_209, "augment_fraction": 10_000 / (39_209 - 1_960)}


def sub_mask(mask: torch.Tensor, rate: float, generator: torch.Generator, count: int = 1) -> torch.Tensor:
    """``count`` random sub-masks of ``mask`` (count×H×W): each pixel keeps its value with
    probability ``rate``, else 0."""
    return mask * (torch.rand(count, *mask.shape, generator=generator) < rate)


@dataclass(frozen=True)
class Poisoning:
    """The training-set manipulation both attacks make, fixed before training: ``poisoned``
    (Sp indices) carry the full ``trigger`` and the ``target`` label, ``augmented`` (Sn indices)
    carry it through ``sub_masks`` (Sn×H×W, in the order of ``augmented``) and keep their label.
    """

    trigger: Trigger
    target: int
    poisoned: torch.Tensor
    augmented: torch.Tensor
    sub_masks: torch.Tensor

    def transform(self, size: int) -> BatchTransform:
        """The batch transform for :func:`~deepdot.training.train` on the ``size`` training images."""
        is_poisoned = torch.zeros(size, dtype=torch.bool)
        is_poisoned[self.poisoned] = True
        slot = torch.full((size,), -1, dtype=torch.long)
        slot[self.augmented] = torch.arange(len(self.augmented))

        def apply(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            hit, s = is_poisoned[idx], slot[idx]
            noisy = s >= 0
            if not (hit.any() or noisy.any()):
                return x, y
            x, y = x.clone(), y.clone()
            x[hit] = self.trigger.apply(x[hit])
            y[hit] = self.target
            m = self.sub_masks[s[noisy]][:, None].to(x.dtype)
            x[noisy] = (1 - m) * x[noisy] + m * self.trigger.pattern.to(x.dtype)
            return x, y

        return apply

    def apply_to(self, data: ImageData) -> ImageData:
        """The manipulated training set itself (to look at, or to check)."""
        x, y = self.transform(len(data))(data.x, data.y, torch.arange(len(data)))
        return ImageData(x, y, data.num_classes, f"{data.name} (poisoned)", data.groups)

    def facts(self) -> dict[str, Any]:
        pixels = int(self.trigger.mask.ne(0).sum())
        kept = self.sub_masks.flatten(1).ne(0).sum(1).float() / max(1, pixels)
        return {
            "poisoned_images": len(self.poisoned),
            "augmented_images": len(self.augmented),
            "mask_pixels": pixels,
            "mask_l1": round(self.trigger.mask_l1, 4),
            "kept_share": round(float(kept.mean()), 4) if len(kept) else None,
        }


@dataclass(frozen=True, kw_only=True)
class _NoiseAugmented:
    """Settings both attacks share (see the module docstring for how they follow the paper).

    Args:
        target: the attacker's label (the paper's MNIST 2, GTSRB 33).
        poison_fraction: Sp as a share of the training set (MNIST: 6 000 of 60 000).
        augment_fraction: Sn as a share of the images *not* poisoned (MNIST: all of them, 1.0;
            GTSRB: 10 000 of the 37 249 left). 0 turns the augmentation off (plain BadNets
            with this trigger).
        sampling_rate: α, the chance that an augmented image's sub-mask keeps a mask pixel.
        seed: chooses the trigger (Alg. 2), the images and the sub-masks.
    """

    target: int = 2
    poison_fraction: float = 0.1
    augment_fraction: float = 1.0
    sampling_rate: float = 0.6
    seed: int = 0

    #: the paper's settings per data set (its Section 4); the defaults are its MNIST ones
    PAPER: ClassVar[dict[str, dict[str, Any]]] = {"mnist": {}, "gtsrb": {**_GTSRB, "sampling_rate": 0.6}}

    @classmethod
    def for_mnist(cls: type[_A], **changes: Any) -> _A:
        """The paper's MNIST settings (Sp 6 000 of 60 000, Sn all the rest, α 0.6, target 2;
        Alg. 2: z 36), with ``changes``."""
        return cls(**{**cls.PAPER["mnist"], **changes})

    @classmethod
    def for_gtsrb(cls: type[_A], **changes: Any) -> _A:
        """The paper's GTSRB settings (Sp 1 960 and Sn 10 000 of 39 209, target 33; Alg. 1: α 0.6,
        Alg. 2: α 0.8 and z 30), with ``changes``."""
        return cls(**{**cls.PAPER["gtsrb"], **changes})

    def __post_init__(self) -> None:
        if not 0.0 < self.sampling_rate <= 1.0:
            raise DeepdotError(f"sampling rate α must be in (0, 1], got {self.sampling_rate}")
        if not 0.0 < self.poison_fraction < 1.0:
            raise DeepdotError(f"poison fraction must be in (0, 1), got {self.poison_fraction}")
        if not 0.0 <= self.augment_fraction <= 1.0:
            raise DeepdotError(f"augment fraction must be in [0, 1], got {self.augment_fraction}")
        if self.target < 0:
            raise DeepdotError(f"target label must be 0 or more, got {self.target}")

    def counts(self, data: ImageData) -> tuple[int, int]:
        """(Sp, Sn) for ``data``, or a :class:`DeepdotError` saying why they do not fit."""
        if not self.target < data.num_classes:
            raise DeepdotError(f"target label {self.target} is outside 0..{data.num_classes - 1}")
        sp, eligible = int(round(self.poison_fraction * len(data))), int((data.y != self.target).sum())
        if sp < 1:
            raise DeepdotError(f"{data.name}: poison fraction {self.poison_fraction} poisons no image")
        if sp > eligible:
            raise DeepdotError(
                f"{data.name}: {sp} images to poison but only {eligible} are not of target label {self.target}"
            )
        return sp, int(round(self.augment_fraction * (len(data) - sp)))

    def poisoning(self, data: ImageData, trigger: Trigger) -> Poisoning:
        """Choose Sp (not of the target label) and Sn (from the rest) and draw Sn sub-masks."""
        sp, sn = self.counts(data)
        if tuple(trigger.mask.shape) != data.image_shape[1:]:
            raise DeepdotError(f"trigger is {tuple(trigger.mask.shape)}, {data.name} is {data.image_shape[1:]}")
        g = torch.Generator().manual_seed(self.seed * 7919 + 1)
        candidates = torch.nonzero(data.y != self.target).flatten()
        poisoned = candidates[torch.randperm(len(candidates), generator=g)[:sp]].sort().values
        others = torch.nonzero(~torch.isin(torch.arange(len(data)), poisoned)).flatten()
        augmented = others[torch.randperm(len(others), generator=g)[:sn]]
        return Poisoning(trigger, self.target, poisoned, augmented, sub_mask(trigger.mask, self.sampling_rate, g, sn))

    def _poison_and_train(
        self, classifier: Classifier, data: tuple[ImageData, ImageData], config: TrainConfig, trigger: Trigger,
        progress: ProgressFn, facts: dict[str, Any],
    ) -> AttackResult:  # fmt: skip
        train_data, test_data = data
        plan = self.poisoning(train_data, trigger)
        transform = plan.transform(len(train_data))
        history = train(classifier, train_data, config, batch_transform=transform, progress=progress)
        return AttackResult(
            clean_accuracy=clean_accuracy(classifier, test_data),
            attack_success_rate=attack_success_rate(classifier, test_data, trigger, self.target),
            target=self.target,
            poisoned_images=len(plan.poisoned),
            history=history,
            trigger=trigger,
            facts={**plan.facts(), "sampling_rate": self.sampling_rate, "seed": self.seed, **facts},
        )


def _check_fits(classifier: Classifier, data: ImageData, what: str) -> None:
    if tuple(classifier.input_shape) != data.image_shape or classifier.num_classes != data.num_classes:
        raise DeepdotError(
            f"{what} takes {'x'.join(map(str, classifier.input_shape))} images and {classifier.num_classes} labels "
            f"but {data.name} has {'x'.join(map(str, data.image_shape))} images and {data.num_classes} labels"
        )


@dataclass(frozen=True, kw_only=True)
class XiongRandom(_NoiseAugmented):
    """Algorithm 2, the randomly generated trigger: ``mask_pixels`` (z) random pixels set to 1,
    a random 0..255 pattern; then poisoning and noise augmentation (shared settings: see
    :class:`_NoiseAugmented`). Defaults: the paper's MNIST settings."""

    method = "xiong-random"
    PAPER: ClassVar[dict[str, dict[str, Any]]] = {
        "mnist": {},
        "gtsrb": {**_GTSRB, "sampling_rate": 0.8, "mask_pixels": 30},
    }

    mask_pixels: int = 36

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mask_pixels < 1:
            raise DeepdotError(f"the mask needs at least 1 pixel, got {self.mask_pixels}")

    def make_trigger(self, image_shape: tuple[int, int, int]) -> Trigger:
        """The random trigger (Algorithm 2, lines 1-4) for images of ``image_shape``, from ``seed``."""
        c, h, w = image_shape
        if self.mask_pixels > h * w:
            raise DeepdotError(f"a mask of {self.mask_pixels} pixels does not fit {h}x{w} images ({h * w} pixels)")
        g = torch.Generator().manual_seed(self.seed)
        mask = torch.zeros(h * w)
        mask[torch.randperm(h * w, generator=g)[: self.mask_pixels]] = 1.0
        pattern = torch.randint(0, 256, (c, h, w), generator=g).float() / 255.0
        return Trigger(mask.view(h, w), pattern)

    def run(
        self,
        classifier: Classifier,
        train_data: ImageData,
        test_data: ImageData,
        config: TrainConfig | None = None,
        *,
        progress: ProgressFn = no_progress,
    ) -> AttackResult:
        """Train ``classifier`` in place into the backdoored model; ``result.trigger`` is the trigger."""
        _check_fits(classifier, train_data, "the model")
        self.counts(train_data)
        trigger = self.make_trigger(train_data.image_shape)
        return self._poison_and_train(
            classifier, (train_data, test_data), config or TrainConfig(), trigger, progress, {}
        )


@dataclass(frozen=True, kw_only=True)
class XiongReconstructed(_NoiseAugmented):
    """Algorithm 1, the reconstructed trigger: the target's trigger reverse-engineered by Neural
    Cleanse on a *clean* model of the same data, used as is (soft mask and pattern); then
    poisoning and noise augmentation (shared settings: see :class:`_NoiseAugmented`). Defaults:
    the paper's MNIST settings.

    Args:
        scanner: reverse-engineers the trigger (default: deepdot's fast Neural Cleanse). Every
            label is scanned, as in the paper ("trigger of each class can be reconstructed"),
            and deepdot's outlier test needs at least three labels anyway.

    The clean model is a :meth:`run` argument (settings hold no models); without one, a copy of
    the classifier as given is first trained on the clean training data with the same
    :class:`~deepdot.training.TrainConfig` (``facts["clean_model"]`` says which).
    """

    method = "xiong-reconstructed"

    scanner: TriggerScanner = FastNeuralCleanse()

    def run(
        self,
        classifier: Classifier,
        train_data: ImageData,
        test_data: ImageData,
        config: TrainConfig | None = None,
        *,
        progress: ProgressFn = no_progress,
        clean_model: Classifier | None = None,
    ) -> AttackResult:
        """Reconstruct the target's trigger on ``clean_model`` (trained here when ``None``), then
        train ``classifier`` in place into the backdoored model; ``result.trigger`` is the trigger."""
        _check_fits(classifier, train_data, "the model")
        self.counts(train_data)
        config = config or TrainConfig()
        facts: dict[str, Any] = {"clean_model": "given" if clean_model is not None else "trained"}
        if clean_model is None:
            clean_model = copy.deepcopy(classifier)
            train(clean_model, train_data, config, progress=_renamed(progress, "train-clean"))
        else:
            _check_fits(clean_model, train_data, "the clean model")
        scan = self.scanner.scan(clean_model, train_data, suspected=[self.target], progress=_renamed(progress, "scan"))
        trigger = scan.trigger_for(self.target)
        by_label = dict(zip(scan.outliers.labels, scan.outliers.indices, strict=True))
        facts.update(
            scan_mode=scan.mode,
            reconstructed_mask_l1=round(trigger.mask_l1, 4),
            clean_model_accuracy=clean_accuracy(clean_model, test_data),
            clean_model_anomaly_index=round(scan.outliers.anomaly_index, 4),
            clean_model_target_index=round(by_label[self.target], 4),
            clean_model_flagged=list(scan.flagged),
            # the trigger is a natural one on the clean model already: how much it does there
            clean_model_attack_success_rate=attack_success_rate(clean_model, test_data, trigger, self.target),
        )
        return self._poison_and_train(classifier, (train_data, test_data), config, trigger, progress, facts)


def _renamed(progress: ProgressFn, prefix: str) -> ProgressFn:
    """``progress`` with each stage prefixed (``train-clean``, ``scan-step``: not the attack's own)."""
    if progress is no_progress:
        return progress

    def forward(event: ProgressEvent) -> None:
        progress(replace(event, stage=prefix if event.stage == "train" else f"{prefix}-{event.stage}"))

    return forward
