"""Paired comparisons over seeds: the mean difference and its 95% Student-t confidence interval.

    d_s = a_s − b_s      for seed s (both methods trained on the same data, initial weights and batches)
    d̄   = mean_s d_s,    se = sd(d) / √n   (sd with n − 1 degrees of freedom)
    CI  = d̄ ± t_{1−(1−level)/2, n−1} · se

The t quantile needs no scipy: for an integer ν the two-sided probability P(|T| ≤ t) has a closed form in
θ = atan(t/√ν) (Abramowitz & Stegun 26.7.3–4),

    ν odd:   (2/π)·(θ + sinθ·Σ_{k=0}^{(ν−3)/2} a_k),   a_0 = cosθ,  a_k = a_{k−1}·(2k/(2k+1))·cos²θ   (ν = 1: 2θ/π)
    ν even:  sinθ·Σ_{k=0}^{(ν−2)/2} b_k,              b_0 = 1,     b_k = b_{k−1}·((2k−1)/(2k))·cos²θ

which increases with t, so the quantile is found by bisection.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence


def t_two_sided_probability(t: float, df: int) -> float:
    """P(|T| ≤ t) for Student's t with ``df`` (a positive int) degrees of freedom, t ≥ 0."""
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"df must be a positive int, got {df!r}")
    theta = math.atan(t / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2:
        if df == 1:
            return 2 * theta / math.pi
        term = total = math.cos(theta)
        for k in range(1, (df - 3) // 2 + 1):
            term *= 2 * k / (2 * k + 1) * c2
            total += term
        return 2 / math.pi * (theta + s * total)
    term = total = 1.0
    for k in range(1, (df - 2) // 2 + 1):
        term *= (2 * k - 1) / (2 * k) * c2
        total += term
    return s * total


def t_quantile(level: float, df: int) -> float:
    """t such that P(|T| ≤ t) = ``level`` (e.g. 0.95 → the 97.5% quantile)."""
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level!r}")
    lo, hi = 0.0, 1.0
    while t_two_sided_probability(hi, df) < level:
        hi *= 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_two_sided_probability(mid, df) < level:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


class Interval(NamedTuple):
    mean: float
    low: float
    high: float
    n: int

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def paired_interval(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Interval:
    """Mean of a_s − b_s and its ``level`` t-interval; needs at least two pairs."""
    if len(a) != len(b):
        raise ValueError(f"paired samples need the same length, got {len(a)} and {len(b)}")
    n = len(a)
    if n < 2:
        raise ValueError("a t-interval needs at least two paired values")
    d = [x - y for x, y in zip(a, b)]
    mean = sum(d) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in d) / (n - 1))
    half = t_quantile(level, n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)
