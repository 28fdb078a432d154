"""Outlier statistics of Neural Cleanse (S&P 2019, §IV-C): median absolute deviation and the
anomaly index. Pure functions on plain numbers.

The anomaly index of a value is ``|value - median| / MAD`` with ``MAD = 1.4826 ·
median(|values - median|)`` (1.4826 makes MAD estimate the standard deviation of normal data).
A label is flagged when its trigger is *smaller* than the median and its index exceeds 2.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from deepdot.results import DEFAULT_THRESHOLD, OutlierStats

CONSISTENCY = 1.4826
#: For normal data, mean absolute deviation × 1.2533 estimates the standard deviation.
MEAN_AD_CONSISTENCY = math.sqrt(math.pi / 2)


def mad(values: Sequence[float]) -> tuple[float, float]:
    """(median, scaled MAD) of ``values``.

    When more than half the values tie, the MAD is 0 and every index would divide by zero;
    then the scaled *mean* absolute deviation is used instead (the usual fallback for the
    modified z-score). When all values are equal both are 0 and every index is 0.
    """
    a = np.asarray(values, dtype=float)
    if a.size == 0:
        raise ValueError("the outlier test needs at least one value")
    med = float(np.median(a))
    dev = np.abs(a - med)
    spread = CONSISTENCY * float(np.median(dev))
    if spread == 0.0:
        spread = MEAN_AD_CONSISTENCY * float(np.mean(dev))
    return med, spread


def anomaly_indices(values: Sequence[float]) -> list[float]:
    """``|value - median| / MAD`` for each value (0 for all when every value is equal)."""
    med, spread = mad(values)
    if spread == 0.0:
        return [0.0] * len(values)
    return [abs(float(v) - med) / spread for v in values]


def outlier_test(norms: Mapping[int, float] | Sequence[float], threshold: float = DEFAULT_THRESHOLD) -> OutlierStats:
    """Neural Cleanse's MAD test on per-label mask L1 norms (a mapping label -> norm, or a list
    indexed by label)."""
    items = sorted(norms.items()) if isinstance(norms, Mapping) else list(enumerate(norms))
    labels = tuple(int(k) for k, _ in items)
    values = [float(v) for _, v in items]
    med, spread = mad(values)
    indices = anomaly_indices(values)
    index = abs(min(values) - med) / spread if spread > 0 else 0.0
    flagged = [
        (idx, label) for label, v, idx in zip(labels, values, indices, strict=True) if v < med and idx > threshold
    ]
    flagged.sort(key=lambda t: -t[0])
    return OutlierStats(
        median=med,
        mad=spread,
        anomaly_index=index,
        indices=tuple(indices),
        flagged=tuple(label for _, label in flagged),
        labels=labels,
        threshold=threshold,
    )
