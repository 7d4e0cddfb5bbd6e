"""Confidence intervals for every figure a report prints: Wilson for proportions, a seeded bootstrap otherwise.

scipy does the statistics; this module only fixes the conventions (95%, percentile
bootstrap, paired resampling of rows) so every stage reports intervals the same way.
"""

from __future__ import annotations

from typing import Callable

from pydantic import BaseModel

CONFIDENCE = 0.95


class Interval(BaseModel):
    low: float
    high: float


def wilson(successes: int, trials: int, confidence: float = CONFIDENCE) -> Interval:
    """The Wilson score interval of a proportion (good at 0%, 100% and small n, unlike the normal one)."""
    from scipy.stats import binomtest

    ci = binomtest(successes, trials).proportion_ci(confidence_level=confidence, method="wilson")
    return Interval(low=float(ci.low), high=float(ci.high))


def bootstrap(columns: tuple[list[float], ...], statistic: Callable, resamples: int, seed: int) -> Interval:
    """Percentile bootstrap interval of `statistic(*columns, axis=-1)`, resampling rows (the columns together).

    `statistic` must accept an `axis` argument (numpy style), so scipy evaluates all resamples at once.
    With a single row, or all rows equal, the interval collapses to the point value.
    """
    import numpy as np
    from scipy.stats import bootstrap as scipy_bootstrap

    data = tuple(np.asarray(c, dtype=float) for c in columns)
    point = float(statistic(*data, axis=-1))
    if len(data[0]) < 2 or all(np.all(c == c[0]) for c in data):
        return Interval(low=point, high=point)
    res = scipy_bootstrap(data, statistic, paired=True, vectorized=True, n_resamples=resamples,
                          confidence_level=CONFIDENCE, method="percentile", rng=np.random.default_rng(seed))
    return Interval(low=float(res.confidence_interval.low), high=float(res.confidence_interval.high))
