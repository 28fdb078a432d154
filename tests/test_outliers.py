import math

import pytest

from deepdot.scan.outliers import CONSISTENCY, anomaly_indices, mad, outlier_test


def test_mad_matches_the_definition():
    values = [10.0, 12.0, 11.0, 13.0, 2.0]
    med, spread = mad(values)
    assert med == 11.0
    assert spread == pytest.approx(CONSISTENCY * 1.0)  # deviations 1,1,0,2,9 -> median 1


def test_flags_only_small_outliers():
    norms = {k: 60.0 + (k % 5) for k in range(20)}
    norms[7] = 10.0  # small trigger: backdoor
    norms[3] = 200.0  # huge trigger: not a backdoor, must not be flagged
    stats = outlier_test(norms)
    assert stats.flagged == (7,)
    assert stats.anomaly_index > 2
    assert stats.anomaly_index == pytest.approx(abs(10.0 - stats.median) / stats.mad)


def test_clean_spread_is_not_flagged():
    stats = outlier_test([30.0, 34.0, 28.0, 31.0, 36.0, 29.0, 33.0, 27.0, 35.0, 32.0])
    assert stats.flagged == () and stats.anomaly_index < 2


def test_reference_numbers_reproduce():
    # the reference README's figures: median 64.47, MAD 13.24, flagged 33 with L1 16.12 -> index 3.65
    assert abs(16.12 - 64.47) / 13.24 == pytest.approx(3.65, abs=0.01)


def test_ties_and_zero_mad_do_not_divide_by_zero():
    tied = [5.0, 5.0, 5.0, 5.0, 1.0]  # median deviation 0 -> fallback to mean deviation
    stats = outlier_test(tied)
    assert math.isfinite(stats.anomaly_index) and stats.mad > 0
    assert stats.flagged == (4,)
    same = outlier_test([3.0, 3.0, 3.0])
    assert same.mad == 0.0 and same.anomaly_index == 0.0 and same.flagged == ()
    assert anomaly_indices([2.0, 2.0]) == [0.0, 0.0]


def test_label_exactly_at_median_is_never_flagged():
    stats = outlier_test([1.0, 50.0, 50.0, 50.0, 51.0, 52.0, 49.0])
    assert stats.median == 50.0 and stats.flagged == (0,)
