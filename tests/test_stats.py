"""Confidence intervals: Student-t for signed means, percentile bootstrap for non-negative ones, Wilson for shares."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from forward_influence.stats import mean_ci, paired_interval, student_t_ci


def test_a_signed_mean_gets_the_student_t_interval():
    x = np.array([-0.2, 0.5, 0.9, np.nan])
    low, high = stats.t.interval(0.95, 2, loc=x[:3].mean(), scale=stats.sem(x[:3]))
    assert mean_ci(x) == pytest.approx((x[:3].mean(), low, high))
    assert np.isnan(mean_ci([0.3])[1]) and np.isnan(mean_ci([])[0])


def test_a_non_negative_mean_never_gets_a_negative_lower_bound():
    kl = np.array([0.001, 0.002, 0.0015, 0.09])  # skewed: the t-interval would reach below zero
    assert stats.t.interval(0.95, 3, loc=kl.mean(), scale=stats.sem(kl))[0] < 0
    mean, low, high = mean_ci(kl)
    expected = stats.bootstrap(
        (kl,), np.mean, n_resamples=9999, method="percentile", random_state=0
    ).confidence_interval
    assert (low, high) == pytest.approx((expected.low, expected.high)) and 0 < low < mean < high
    assert mean_ci(kl) == mean_ci(kl)  # seeded: reruns give identical tables


def test_shares_get_the_wilson_interval_inside_zero_one():
    # 1 of 9 correct: Wilson 95% interval, z = 1.96 (as a textbook formula)
    n, k, z = 9, 1, stats.norm.ppf(0.975)
    p = k / n
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / (1 + z**2 / n)
    assert mean_ci([1] + [0] * 8) == pytest.approx((p, centre - half, centre + half))
    mean, low, high = mean_ci([1] * 9)
    assert mean == 1.0 and high == pytest.approx(1.0) and 0.6 < low < 0.75  # not a degenerate [1, 1]


def test_paired_differences_of_zero_and_one_stay_differences():
    # a difference of 0 or 1 per item is no share of 0/1 outcomes: no Wilson interval, no bootstrap
    differences = np.array([0.0, 1.0, 1.0, 0.0, 1.0])
    low, high = stats.t.interval(0.95, 4, loc=0.6, scale=stats.sem(differences))
    assert student_t_ci(differences) == pytest.approx((0.6, low, high)) and low < 0
    assert student_t_ci(np.zeros(20)) == (0.0, 0.0, 0.0)  # mean_ci would give Wilson's [0, 0.16]
    assert mean_ci(np.zeros(20))[2] == pytest.approx(0.161, abs=1e-3)


def test_a_statistic_of_paired_samples_resamples_the_same_items_from_each():
    a, b = np.array([1.0, 2.0, 3.0, 4.0, 10.0]), np.array([1.0, 1.0, 2.0, 2.0, 1.0])

    def ratio(x, y):
        return x.mean() / y.mean()

    low, high = paired_interval((a, b), ratio)
    expected = stats.bootstrap(
        (a, b), ratio, paired=True, vectorized=False, n_resamples=9999, method="percentile", random_state=0
    ).confidence_interval
    assert (low, high) == (expected.low, expected.high) and low < ratio(a, b) < high
    unpaired = stats.bootstrap(
        (a, b), ratio, paired=False, vectorized=False, n_resamples=9999, method="percentile", random_state=0
    ).confidence_interval
    assert (low, high) != (unpaired.low, unpaired.high)
