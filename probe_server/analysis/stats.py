"""Confidence intervals for adoption rates.

The Wilson score interval (Wilson 1927) keeps its coverage for small samples
and for rates near 0, where the normal approximation collapses to [0, 0]:
India's 0 of 148 still gets an upper bound. The ``report_adoption`` view
computes the same formula in SQL.
"""

from __future__ import annotations

import math

# Two-sided 95%: the 0.975 quantile of the standard normal distribution.
Z95 = 1.959963984540054

# Fewer IPv4 addresses than this and a rate is marked as too small a sample
# to say anything: the paper draws conclusions only for the USA (322) and
# India (148), not for Great Britain (13) or Japan (7).
MIN_SAMPLE = 30


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval for ``successes`` out of ``n``."""
    if n <= 0:
        raise ValueError("an interval needs at least one observation")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be within 0..{n}, got {successes}")
    p = successes / n
    z2 = z * z
    denominator = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # Rounding can push a bound a hair past 0 or 1 when p is 0 or 1.
    return max(0.0, centre - half), min(1.0, centre + half)
