"""Means with Student-t confidence intervals, for results over a few paired seeds (dpar ablate)."""
from __future__ import annotations

import math


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) of Student's t with an integer ``df`` >= 1 (closed form, Abramowitz & Stegun 26.7.3-4)."""
    if not (isinstance(df, int) and df >= 1):
        raise ValueError(f"df must be an integer >= 1, got {df!r}")
    theta = math.atan(t / math.sqrt(df))
    sin, cos2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2:  # odd: (2/pi) (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...))
        term, total = 1.0, 1.0 if df > 1 else 0.0
        for k in range(1, (df - 1) // 2):
            term *= cos2 * 2 * k / (2 * k + 1)
            total += term
        central = 2 / math.pi * (theta + sin * math.cos(theta) * total)
    else:  # even: sin (1 + cos^2/2 + 1*3/(2*4) cos^4 + ...)
        term, total = 1.0, 1.0
        for k in range(1, df // 2):
            term *= cos2 * (2 * k - 1) / (2 * k)
            total += term
        central = sin * total
    return 0.5 + 0.5 * central


def t_quantile(probability: float, df: int) -> float:
    """The ``probability`` quantile of Student's t with ``df`` degrees of freedom (bisection on t_cdf)."""
    if not 0 < probability < 1:
        raise ValueError(f"probability must be in (0, 1), got {probability}")
    low, high = -1e6, 1e6
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if t_cdf(middle, df) < probability else (low, middle)
    return (low + high) / 2


def mean_interval(values: list[float], confidence: float = 0.95) -> dict:
    """{"mean", "low", "high", "half_width", "n", "values"}: the mean of ``values`` and its two-sided t interval
    (needs at least two values)."""
    values = [float(v) for v in values]
    n = len(values)
    if n < 2:
        raise ValueError(f"an interval needs at least two values, got {n}")
    mean = sum(values) / n
    spread = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(0.5 + confidence / 2, n - 1) * spread / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "half_width": half, "n": n, "values": values}


def paired_difference(first: list[float], second: list[float], confidence: float = 0.95) -> dict:
    """mean_interval of first[i] - second[i] (paired by seed), plus "excludes_zero" and "sign" ("lower" when the
    interval lies below zero, "higher" above, "unresolved" when it contains zero)."""
    if len(first) != len(second):
        raise ValueError(f"paired values need equal lengths, got {len(first)} and {len(second)}")
    result = mean_interval([a - b for a, b in zip(first, second)], confidence)
    result["excludes_zero"] = result["low"] > 0 or result["high"] < 0
    result["sign"] = "lower" if result["high"] < 0 else "higher" if result["low"] > 0 else "unresolved"
    return result
