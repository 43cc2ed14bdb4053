"""Confidence intervals for the audit's measured rates and means (95% by default).

Why not a bare number: audits run few attacks (tens of reconstructions), so a share of 0/20
and one of 3/20 are not clearly different; the interval says how far the data pin a rate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

#: Two-sided 95% normal quantile.
Z95 = 1.959963984540054


def wilson_interval(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (sensible at 0/n and n/n)."""
    if trials <= 0:
        return 0.0, 1.0
    p = successes / trials
    denom = 1.0 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_interval(values: Sequence[float], z: float = Z95) -> tuple[float, float, float] | None:
    """(mean, low, high) with a normal-approximation interval; None without finite values."""
    finite = [float(v) for v in values if math.isfinite(v)]
    if not finite:
        return None
    mean = sum(finite) / len(finite)
    if len(finite) < 2:
        return mean, mean, mean
    var = sum((v - mean) ** 2 for v in finite) / (len(finite) - 1)
    half = z * math.sqrt(var / len(finite))
    return mean, mean - half, mean + half
