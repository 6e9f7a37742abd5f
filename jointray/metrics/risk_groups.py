"""Risk groups: subjects split at the tertiles (or other quantiles) of their predicted risk, and the
log-rank test of whether the groups' survival differs.

A risk model that separates patients shows Kaplan–Meier curves that fan out by group; the
multivariate log-rank test (Mantel 1966; lifelines' ``multivariate_logrank_test``) gives the
chi-squared statistic on ``groups − 1`` degrees of freedom and its p-value. Groups are the
quantiles of the predicted risk (``pandas.qcut``): group 0 the lowest risk. Harrell's C
(:mod:`jointray.metrics.survival`) says how well the risks order the events; the groups say whether
that ordering separates survival enough to act on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class RiskGroups:
    """``group`` (n,) int, 0 = lowest risk, −1 where a subject had a missing input; ``statistic`` and
    ``p`` of the log-rank test (NaN when fewer than two groups have subjects or no event occurred)."""

    group: np.ndarray
    statistic: float
    p: float
    n: int  # subjects with risk, time and event


def risk_groups(risk: np.ndarray, time: np.ndarray, event: np.ndarray, groups: int = 3) -> RiskGroups:
    """Split subjects at the quantiles of ``risk`` into ``groups`` and test their survival.

    Args:
        risk: (n,) predicted risk (higher = earlier event).
        time: (n,) time to event or censoring.
        event: (n,) 1 where the event was observed, 0 where censored.
        groups: number of quantile groups (3: tertiles).

    Returns:
        :class:`RiskGroups`. Tied risks at a quantile boundary fall in one group (``qcut`` with
        duplicate edges dropped), so there may be fewer groups than asked for.
    """
    from lifelines.statistics import multivariate_logrank_test

    risk, time, event = (np.asarray(a, dtype=np.float64).reshape(-1) for a in (risk, time, event))
    complete = ~(np.isnan(risk) | np.isnan(time) | np.isnan(event))
    group = np.full(risk.shape, -1, dtype=np.int64)
    n = int(complete.sum())
    if n < groups:
        return RiskGroups(group, math.nan, math.nan, n)
    group[complete] = pd.qcut(risk[complete], groups, labels=False, duplicates="drop")
    kept = group[complete]
    if len(np.unique(kept)) < 2 or event[complete].sum() == 0:
        return RiskGroups(group, math.nan, math.nan, n)
    test = multivariate_logrank_test(time[complete], kept, event[complete])
    return RiskGroups(group, float(test.test_statistic), float(test.p_value), n)
