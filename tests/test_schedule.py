"""The bookkeeping both scanners share (deepdot.scan.schedule), against the reference's rules
written out one label at a time."""

from __future__ import annotations

import math
import random

import pytest
import torch

from deepdot.scan.schedule import BestTrigger, CostSchedule, EarlyStop


class ReferenceCost:
    """The reference code's cost schedule for one label, as its source reads (plain floats)."""

    def __init__(self, init_cost: float, patience: int, multiplier: float, threshold: float) -> None:
        self.init_cost, self.patience, self.threshold = init_cost, patience, threshold
        self.up, self.down = multiplier, multiplier**1.5
        self.cost, self.set_c, self.up_c, self.down_c = 0.0, 0, 0, 0
        self.up_flag = self.down_flag = False

    def update(self, success: float) -> None:
        ok = success >= self.threshold
        if self.cost == 0 and ok:
            self.set_c += 1
            if self.set_c >= self.patience:
                self.cost, self.up_c, self.down_c = self.init_cost, 0, 0
                self.up_flag = self.down_flag = False
        else:
            self.set_c = 0
        if ok:
            self.up_c, self.down_c = self.up_c + 1, 0
        else:
            self.up_c, self.down_c = 0, self.down_c + 1
        if self.up_c >= self.patience:
            self.up_c, self.cost, self.up_flag = 0, self.cost * self.up, True
        elif self.down_c >= self.patience:
            self.down_c, self.cost, self.down_flag = 0, self.cost / self.down, True


SETTINGS = {"init_cost": 1e-3, "patience": 5, "multiplier": 2.0, "threshold": 0.99}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cost_schedule_follows_the_reference_on_every_row(dtype):
    rng = random.Random(0)
    k = 4
    refs = [ReferenceCost(**SETTINGS) for _ in range(k)]
    schedule = CostSchedule(k, **SETTINGS, dtype=dtype)
    for _ in range(400):
        rows = [i for i in range(k) if rng.random() < 0.8]  # some rows sit a step out
        if not rows:
            continue
        success = [rng.choice([1.0, 0.995, 0.99, 0.5, 0.0]) if rng.random() < 0.7 else 1.0 for _ in rows]
        for i, s in zip(rows, success, strict=True):
            refs[i].update(s)
        schedule.update(torch.tensor(rows), torch.tensor(success, dtype=dtype))
        for i, ref in enumerate(refs):
            assert float(schedule.cost[i]) == pytest.approx(ref.cost, rel=1e-6)
            assert bool(schedule.up_flag[i]) == ref.up_flag and bool(schedule.down_flag[i]) == ref.down_flag
    assert any(ref.cost > 0 for ref in refs) and any(ref.down_flag for ref in refs)  # the walk exercised the rules


def test_cost_stops_at_its_ceiling_and_says_so():
    """A saturated mask never shrinks: the reference doubles its cost towards 1e37."""
    schedule = CostSchedule(2, **SETTINGS, max_cost=1.0)
    for _ in range(200):
        schedule.update(torch.tensor([0]), torch.tensor([1.0]))
    assert float(schedule.cost[0]) == 1.0 and bool(schedule.capped[0])
    assert float(schedule.cost[1]) == 0.0 and not bool(schedule.capped[1])


def test_best_trigger_keeps_the_smallest_working_mask_on_smoothed_figures():
    best = BestTrigger(1, (1, 2, 2), threshold=0.9, smoothing=2)
    row = torch.tensor([0])

    def step(success: float, l1: float) -> None:
        best.record(row, torch.tensor([success]), torch.tensor([l1]), torch.full((1, 2, 2), l1), torch.ones(1, 1, 2, 2))

    step(1.0, 4.0)  # average of one step
    assert float(best.reg[0]) == 4.0
    step(0.5, 1.0)  # average success 0.75: not a working mask
    assert float(best.reg[0]) == 4.0
    step(1.0, 2.0)  # (0.5 + 1.0) / 2 = 0.75: still not
    step(1.0, 2.0)  # 1.0 over both, L1 2.0
    assert float(best.reg[0]) == 2.0 and float(best.mask[0, 0, 0]) == 2.0


def test_early_stop_needs_the_cost_to_have_moved_both_ways():
    schedule = CostSchedule(1, **SETTINGS)
    best = BestTrigger(1, (1, 1, 1), threshold=0.5)
    stop = EarlyStop(1, threshold=1.0, patience=3)
    row = torch.tensor([0])
    best.record(row, torch.tensor([1.0]), torch.tensor([1.0]), torch.ones(1, 1, 1), torch.ones(1, 1, 1, 1))
    for _ in range(5):
        assert not bool(stop.update(row, best, schedule)[0])  # no gain, but the cost never moved
    schedule.up_flag[0] = schedule.down_flag[0] = True
    assert bool(stop.update(row, best, schedule)[0])
    assert not bool(EarlyStop(1, threshold=1.0, patience=None).update(row, best, schedule)[0])
    assert math.isfinite(float(stop.best[0]))
