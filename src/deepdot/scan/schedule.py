"""The bookkeeping of Neural Cleanse's optimisation, over K labels at once.

The reference code adapts the weight of the mask's L1 term (the *cost*) per label as it goes,
keeps the smallest mask that still works, and stops a label early. Both scanners use the classes
here — the faithful one with K = 1 row, the fast one with a row per label — so they follow the
same rules by construction, and one test covers both.

* :class:`CostSchedule`: the cost starts at 0; once the trigger has worked for ``patience``
  steps it is set to ``init_cost``; after ``patience`` steps in a row that reach the success
  threshold it is multiplied by ``multiplier``, after ``patience`` steps that miss it divided by
  ``multiplier ** 1.5``. The reference has no ceiling: when mask pixels saturate at 1 the mask
  cannot shrink, the cost doubles every ``patience`` steps up to ~1e37 and only an inf/NaN loss
  ends the label. Here the cost stops at ``max_cost`` and :attr:`CostSchedule.capped` says which
  rows reached it.
* :class:`BestTrigger`: the smallest mask among steps whose success reached the threshold,
  judged on the last ``smoothing`` steps' average (1 = the reference: that step alone).
* :class:`EarlyStop`: the reference's rule: a label stops once its cost has moved both up and
  down and its best L1 has not dropped below ``threshold`` × its best for ``patience`` steps.

Everything is a tensor over rows; callers pass the indices of the rows that ran a step. The
figures are kept in ``dtype``: float64 for the faithful scanner (the reference computes them as
Python floats), float32 for the fast one.
"""

from __future__ import annotations

import math

import torch

#: the cost never grows past this (the reference's would reach ~1e37 on saturated masks)
MAX_COST = 1e6


class CostSchedule:
    """The reference cost schedule for K rows (see the module docstring)."""

    def __init__(
        self,
        k: int,
        *,
        init_cost: float,
        patience: int,
        multiplier: float,
        threshold: float,
        max_cost: float = MAX_COST,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.init_cost, self.patience, self.threshold, self.max_cost = init_cost, patience, threshold, max_cost
        self.up, self.down = multiplier, multiplier**1.5
        self.cost = torch.zeros(k, dtype=dtype, device=device)
        zeros = torch.zeros(k, dtype=torch.long, device=device)
        self.set_counter, self.up_counter, self.down_counter = zeros.clone(), zeros.clone(), zeros.clone()
        self.up_flag = torch.zeros(k, dtype=torch.bool, device=device)
        self.down_flag = self.up_flag.clone()
        self.capped = self.up_flag.clone()

    def update(self, rows: torch.Tensor, success: torch.Tensor) -> None:
        """Move the cost of ``rows`` after a step whose attack success was ``success`` (per row)."""
        ok = success.to(self.cost.device) >= self.threshold
        cost = self.cost[rows]
        arm = (cost == 0) & ok
        set_c = torch.where(arm, self.set_counter[rows] + 1, torch.zeros_like(self.set_counter[rows]))
        fire = arm & (set_c >= self.patience)
        cost = torch.where(fire, torch.full_like(cost, self.init_cost), cost)
        up = torch.where(fire, torch.zeros_like(set_c), self.up_counter[rows])
        down = torch.where(fire, torch.zeros_like(set_c), self.down_counter[rows])
        up_flag, down_flag = self.up_flag[rows] & ~fire, self.down_flag[rows] & ~fire
        up = torch.where(ok, up + 1, torch.zeros_like(up))
        down = torch.where(ok, torch.zeros_like(down), down + 1)
        raise_ = up >= self.patience
        lower = ~raise_ & (down >= self.patience)
        raised = cost * self.up
        capped = raise_ & (raised > self.max_cost)
        cost = torch.where(raise_, raised.clamp(max=self.max_cost), cost)
        cost = torch.where(lower, cost / self.down, cost)
        self.cost[rows] = cost
        self.set_counter[rows] = set_c
        self.up_counter[rows] = torch.where(raise_, torch.zeros_like(up), up)
        self.down_counter[rows] = torch.where(lower, torch.zeros_like(down), down)
        self.up_flag[rows], self.down_flag[rows] = up_flag | raise_, down_flag | lower
        self.capped[rows] |= capped


class BestTrigger:
    """The smallest working mask (and its pattern) of each of K rows."""

    def __init__(
        self,
        k: int,
        image_shape: tuple[int, int, int],
        *,
        threshold: float,
        smoothing: int = 1,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        c, h, w = image_shape
        self.threshold, self.smoothing = threshold, smoothing
        self.reg = torch.full((k,), math.inf, dtype=dtype, device=device)
        self.success = torch.zeros(k, dtype=dtype, device=device)
        self.mask = torch.zeros(k, h, w, device=device)
        self.pattern = torch.zeros(k, c, h, w, device=device)
        self.recent_success = torch.zeros(k, smoothing, dtype=dtype, device=device)
        self.recent_reg = torch.zeros(k, smoothing, dtype=dtype, device=device)
        self.steps = torch.zeros(k, dtype=torch.long, device=device)

    @property
    def found(self) -> torch.Tensor:
        """Rows that have a working mask."""
        return self.reg < math.inf

    def record(
        self, rows: torch.Tensor, success: torch.Tensor, reg: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor
    ) -> None:
        """After a step of ``rows``: their success and mask L1 (this step's averages) and the
        masks and patterns they ended the step with (``len(rows)``×H×W, ×C×H×W)."""
        self.steps[rows] += 1
        slot = (self.steps[rows] - 1) % self.smoothing
        self.recent_success[rows, slot] = success.to(self.success)
        self.recent_reg[rows, slot] = reg.to(self.reg)
        seen = self.steps[rows].clamp(max=self.smoothing)
        success_avg = self.recent_success[rows].sum(1) / seen
        reg_avg = self.recent_reg[rows].sum(1) / seen
        better = (success_avg >= self.threshold) & (reg_avg < self.reg[rows])
        if better.any():
            chosen = rows[better]
            self.reg[chosen] = reg_avg[better]
            self.success[chosen] = success_avg[better]
            self.mask[chosen] = mask[better].detach().to(self.mask)
            self.pattern[chosen] = pattern[better].detach().to(self.pattern)


class EarlyStop:
    """The reference's early stopping for K rows; ``patience=None`` never stops."""

    def __init__(
        self,
        k: int,
        *,
        threshold: float,
        patience: int | None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.threshold, self.patience = threshold, patience
        self.best = torch.full((k,), math.inf, dtype=dtype, device=device)
        self.counter = torch.zeros(k, dtype=torch.long, device=device)

    def update(self, rows: torch.Tensor, best: BestTrigger, schedule: CostSchedule) -> torch.Tensor:
        """Rows (a boolean per entry of ``rows``) that stop after this step. Call it after
        :meth:`BestTrigger.record` and before :meth:`CostSchedule.update`, as the reference does."""
        reg = best.reg[rows]
        no_gain = reg >= self.threshold * self.best[rows]
        counter = self.counter[rows]
        self.counter[rows] = torch.where(reg < math.inf, torch.where(no_gain, counter + 1, 0), counter)
        self.best[rows] = torch.minimum(self.best[rows], reg)
        if self.patience is None:
            return torch.zeros(len(rows), dtype=torch.bool, device=rows.device)
        moved = schedule.up_flag[rows] & schedule.down_flag[rows]
        return moved & (self.counter[rows] >= self.patience)
