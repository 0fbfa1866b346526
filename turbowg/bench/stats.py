"""Small-sample statistics for benchmark reports: median with a distribution-free 95% CI.

Benchmarks here run each configuration only a handful of times and throughput samples are often
skewed (a noisy neighbour makes one run slow, never fast), so the median with an order-statistic
confidence interval is reported rather than a mean with a normal-theory interval. The interval is
[x_(k), x_(n-k+1)] where k is the largest rank with P(Binomial(n, 1/2) < k) <= alpha/2; it holds for
any continuous distribution. With fewer than 6 samples no such k exists at 95%, so the interval falls
back to [min, max] and `coverage` says what that interval actually covers (93.75% for n = 5).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass


def _binomial_half_cdf(k: int, n: int) -> float:
    """P(Binomial(n, 1/2) <= k)."""
    if k < 0:
        return 0.0
    return sum(math.comb(n, i) for i in range(min(k, n) + 1)) / 2.0**n


def median(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("median of no values")
    ordered = sorted(values)
    n = len(ordered)
    mid = n // 2
    return float(ordered[mid]) if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2.0


def median_ci_with_coverage(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float, float]:
    """(median, lo, hi, achieved_coverage) with an order-statistic interval for the median."""
    if not values:
        raise ValueError("median_ci of no values")
    if not 0.0 < confidence < 1.0:
        raise ValueError("confidence must be in (0, 1)")
    ordered = sorted(float(v) for v in values)
    n = len(ordered)
    med = median(ordered)
    if n == 1:
        return med, ordered[0], ordered[0], 0.0
    alpha_half = (1.0 - confidence) / 2.0
    # Largest k (1-based rank) with P(B <= k-1) <= alpha/2; coverage of [x_k, x_{n-k+1}] is 1 - 2 P(B <= k-1).
    best_k = 0
    for k in range(1, n // 2 + 1):
        if _binomial_half_cdf(k - 1, n) <= alpha_half:
            best_k = k
        else:
            break
    if best_k == 0:
        best_k = 1  # not enough samples for the requested confidence: widest interval available
    coverage = 1.0 - 2.0 * _binomial_half_cdf(best_k - 1, n)
    return med, ordered[best_k - 1], ordered[n - best_k], coverage


def median_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(median, lo, hi): median and a distribution-free confidence interval for it."""
    med, lo, hi, _ = median_ci_with_coverage(values, confidence)
    return med, lo, hi


@dataclass(frozen=True)
class Summary:
    n: int
    median: float
    lo: float  # lower bound of the CI for the median
    hi: float  # upper bound of the CI for the median
    coverage: float  # what the [lo, hi] interval actually covers (>= 0.95 once n >= 6)
    mean: float
    stdev: float  # sample standard deviation (n - 1); 0 for a single value
    min: float
    max: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def format(self, fmt: str = "{:.1f}") -> str:
        """"median [lo, hi]" for tables."""
        return f"{fmt.format(self.median)} [{fmt.format(self.lo)}, {fmt.format(self.hi)}]"


def summarize(values: Sequence[float], confidence: float = 0.95) -> Summary:
    """Median with CI plus mean, sample stdev, min and max."""
    med, lo, hi, coverage = median_ci_with_coverage(values, confidence)
    n = len(values)
    mean = math.fsum(values) / n
    stdev = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return Summary(n, med, lo, hi, coverage, mean, stdev, float(min(values)), float(max(values)))
