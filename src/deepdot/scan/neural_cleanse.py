"""Neural Cleanse trigger reverse engineering, faithful to the reference implementation.

Wang et al., "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in Neural Networks",
IEEE S&P 2019. For each candidate label t, optimise a mask m (H×W) and pattern p (C×H×W), both
tanh-parametrised, to minimise ``CE(f((1 - m)·x + m·p), t) + cost · |m|_1`` over clean images,
with Adam(lr 0.1, betas 0.5/0.9) and the reference's cost schedule, best-mask bookkeeping and
early stopping (``scan/schedule.py``, shared with the fast scan). Labels run one after another.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from deepdot.errors import DeepdotError
from deepdot.models import Classifier
from deepdot.progress import ProgressEvent, ProgressFn
from deepdot.scan.base import (
    CROSS_ENTROPY,
    TriggerScanner,
    from_tanh_space,
    label_generator,
    to_tanh_space,
    trigger_loss,
)
from deepdot.scan.result import LabelTrigger
from deepdot.scan.schedule import BestTrigger, CostSchedule, EarlyStop
from deepdot.triggers import Trigger


class BatchStream:
    """Endless mini-batches of ``batch_size`` images, reshuffled after each pass over ``x``
    (what Keras' ``ImageDataGenerator.flow`` feeds the reference)."""

    def __init__(self, x: torch.Tensor, batch_size: int, generator: torch.Generator) -> None:
        self.x, self.batch_size, self.generator = x, batch_size, generator
        self._perm = torch.randperm(len(x), generator=generator)
        self._pos = 0

    def next(self) -> torch.Tensor:
        if self._pos + self.batch_size > len(self._perm):
            rest = self._perm[self._pos :]
            self._perm = torch.cat([rest, torch.randperm(len(self.x), generator=self.generator)])
            self._pos = 0
        idx = self._perm[self._pos : self._pos + self.batch_size]
        self._pos += self.batch_size
        return self.x[idx]


@dataclass(frozen=True, kw_only=True)
class NeuralCleanse(TriggerScanner):
    """Faithful Neural Cleanse scan. Defaults are the reference code's (GTSRB example).

    Args:
        steps: optimisation steps per label (reference 1000; the seed notebook 500).
        samples_per_step: clean images per step (reference NB_SAMPLE 1000; notebook 500);
            a step is ``samples_per_step // batch_size`` mini-batches.
        batch_size: images per mini-batch (32).
        lr: Adam learning rate (0.1); betas are (0.5, 0.9) as in the reference.
        init_cost: weight of the L1 term once a trigger first works (1e-3).
        patience: steps before the cost is set, raised or lowered (5).
        cost_multiplier: raise ×multiplier, lower ÷multiplier**1.5 (2).
        early_stop / early_stop_threshold / early_stop_patience: stop a label once the cost has
            moved both up and down and the best L1 has not dropped below threshold × its best
            for ``early_stop_patience`` steps (True, 1.0, 25).
    """

    steps: int = 1000
    samples_per_step: int = 1000
    batch_size: int = 32
    lr: float = 0.1
    init_cost: float = 1e-3
    patience: int = 5
    cost_multiplier: float = 2.0
    early_stop: bool = True
    early_stop_threshold: float = 1.0
    early_stop_patience: int = 25

    mode = "faithful"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.steps < 1 or self.batch_size < 1 or self.samples_per_step < self.batch_size:
            raise DeepdotError("steps >= 1, batch size >= 1 and samples per step >= batch size are required")
        if self.lr <= 0 or self.init_cost <= 0 or self.cost_multiplier <= 1 or self.patience < 1:
            raise DeepdotError("lr and init cost must be positive, cost multiplier > 1, patience >= 1")

    def _reverse(
        self, classifier: Classifier, x: torch.Tensor, labels: list[int], progress: ProgressFn
    ) -> Iterator[LabelTrigger]:
        for i, label in enumerate(labels):
            progress(ProgressEvent("label", i, len(labels), {"label": label}))
            yield self.reverse_engineer(classifier, x, label, progress=progress)
            progress(ProgressEvent("label", i + 1, len(labels), {"label": label}))

    def reverse_engineer(
        self, classifier: Classifier, x: torch.Tensor, label: int, *, progress: ProgressFn | None = None
    ) -> LabelTrigger:
        """Optimise the smallest trigger that sends the images ``x`` (N×C×H×W, [0, 1]) to ``label``.

        The classifier's weights should be frozen (``scan`` does this).
        """
        start, cpu_start = time.perf_counter(), time.process_time()
        gen = label_generator(self.seed, label)
        c, h, w = x.shape[1:]
        device = classifier.device
        mask_t = to_tanh_space(torch.rand(h, w, generator=gen)).to(device).requires_grad_(True)
        pattern_t = to_tanh_space(torch.rand(c, h, w, generator=gen)).to(device).requires_grad_(True)
        opt = torch.optim.Adam([mask_t, pattern_t], lr=self.lr, betas=(0.5, 0.9), eps=1e-7)  # Keras eps
        stream = BatchStream(x, self.batch_size, gen)
        mini_batches = self.samples_per_step // self.batch_size
        target = torch.full((self.batch_size,), label, dtype=torch.long, device=device)
        # the shared bookkeeping (scan/schedule.py) with one row, in double precision as the
        # reference's Python floats
        row, thr = torch.zeros(1, dtype=torch.long), self.attack_success_threshold
        schedule = CostSchedule(
            1, init_cost=self.init_cost, patience=self.patience, multiplier=self.cost_multiplier, threshold=thr,
            dtype=torch.float64,
        )  # fmt: skip
        best = BestTrigger(1, (c, h, w), threshold=thr, dtype=torch.float64)
        stop = EarlyStop(
            1, threshold=self.early_stop_threshold, patience=self.early_stop_patience if self.early_stop else None,
            dtype=torch.float64,
        )  # fmt: skip

        passes, steps_run, success = 0, 0, 0.0
        for step in range(self.steps):
            cost = float(schedule.cost[0])
            ce_sum = reg_sum = acc_sum = 0.0
            for _ in range(mini_batches):
                xb = stream.next().to(device)
                mask = from_tanh_space(mask_t)
                pattern = from_tanh_space(pattern_t)
                logits = classifier((1 - mask) * xb + mask * pattern)
                ce = (
                    F.cross_entropy(logits, target)
                    if self.loss == CROSS_ENTROPY
                    else trigger_loss(logits, target, self.loss).mean()
                )
                reg = mask.sum()
                loss = ce + cost * reg
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                passes += len(xb)
                ce_sum += ce.item()
                reg_sum += reg.item()
                acc_sum += (logits.argmax(1) == label).float().mean().item()
            steps_run = step + 1
            success, reg_avg = acc_sum / mini_batches, reg_sum / mini_batches
            with torch.no_grad():
                best.record(
                    row,
                    torch.tensor([success], dtype=torch.float64),
                    torch.tensor([reg_avg], dtype=torch.float64),
                    from_tanh_space(mask_t)[None],
                    from_tanh_space(pattern_t)[None],
                )
            if progress is not None:
                figures = {
                    "label": label,
                    "cost": cost,
                    "success": success,
                    "l1": reg_avg,
                    "best_l1": float(best.reg[0]),
                }
                progress(ProgressEvent("step", steps_run, self.steps, figures))
            if bool(stop.update(row, best, schedule)[0]):
                break
            schedule.update(row, torch.tensor([success], dtype=torch.float64))

        reached = bool(best.found[0])
        if reached:
            best_mask, best_pattern, best_success = best.mask[0], best.pattern[0], float(best.success[0])
        else:  # never reached the threshold: keep the last trigger
            with torch.no_grad():
                best_mask, best_pattern = from_tanh_space(mask_t).detach(), from_tanh_space(pattern_t).detach()
            best_success = success
        trigger = Trigger(best_mask.detach().cpu().clone().clamp(0, 1), best_pattern.detach().cpu().clone().clamp(0, 1))
        return LabelTrigger(
            label=label,
            trigger=trigger,
            mask_l1=trigger.mask_l1,
            attack_success_rate=best_success,
            reached_threshold=reached,
            steps=steps_run,
            image_passes=passes,
            seconds=time.perf_counter() - start,
            cpu_seconds=time.process_time() - cpu_start,
        )
