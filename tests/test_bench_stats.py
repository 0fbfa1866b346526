"""Median confidence intervals used by the benchmark reports."""

from __future__ import annotations

import random

import pytest

from turbowg.bench.stats import median_ci, median_ci_with_coverage, summarize


def test_small_samples_fall_back_to_min_max_and_say_so() -> None:
    med, lo, hi, coverage = median_ci_with_coverage([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (med, lo, hi) == (3.0, 1.0, 5.0)
    assert coverage == pytest.approx(1 - 2 / 32)  # [min, max] of 5 covers the median 93.75% of the time


def test_order_statistic_interval_for_larger_samples() -> None:
    values = list(range(1, 21))  # n = 20: the 95% interval is [x_6, x_15]
    med, lo, hi, coverage = median_ci_with_coverage(values)
    assert (med, lo, hi) == (10.5, 6, 15)
    assert coverage >= 0.95


def test_interval_covers_true_median_about_95_percent_of_the_time() -> None:
    rng = random.Random(7)
    trials, hits = 2000, 0
    for _ in range(trials):
        sample = [rng.expovariate(1.0) for _ in range(15)]  # skewed; true median ln 2
        _, lo, hi = median_ci(sample)
        hits += lo <= 0.6931471805599453 <= hi
    assert 0.93 <= hits / trials <= 0.99


def test_summarize_and_errors() -> None:
    s = summarize([2.0, 4.0, 6.0])
    assert (s.n, s.median, s.mean, s.stdev, s.min, s.max) == (3, 4.0, 4.0, 2.0, 2.0, 6.0)
    assert s.format("{:.0f}") == "4 [2, 6]"
    with pytest.raises(ValueError):
        median_ci([])
