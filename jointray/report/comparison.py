"""Paired comparison of models evaluated on the same cases: "does multi-task help?" with its uncertainty.

For every per-case metric that two evaluations share (Dice and HD95 per structure, the MMSE absolute
error, whether the CDR stage was right), over the cases both predicted: each model's mean, the mean
paired difference (model − reference, the first evaluation), its 95 % bootstrap percentile interval
(``scipy.stats.bootstrap``, 2000 resamples of the cases, a fixed seed) and the two-sided Wilcoxon
signed-rank test (``scipy.stats.wilcoxon``; p = 1 when every pair is equal). Pairing removes the
between-case spread, which on tens of cases is far larger than the difference between two models.
Wilcoxon F., Biometrics Bulletin 1 (1945) 80–83.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

#: Per-case columns compared, and whether higher is better.
HIGHER_IS_BETTER = {"dice/": True, "hd95/": False, "mmse_abs_error": False, "cdr_correct": True}
RESAMPLES = 2000


@dataclass(frozen=True)
class PairedDifference:
    metric: str
    reference: str
    model: str
    n: int  # cases with the metric in both
    reference_mean: float
    model_mean: float
    difference: float  # mean of model − reference
    low: float  # 95 % bootstrap interval of the difference
    high: float
    p: float  # Wilcoxon signed-rank, two-sided
    higher_is_better: bool

    @property
    def better(self) -> str:
        """Which model the difference favours, when the test rejects at 0.05; else "neither"."""
        if not self.p < 0.05:
            return "neither"
        return self.model if (self.difference > 0) == self.higher_is_better else self.reference


def compared_columns(columns: list[str]) -> list[str]:
    return [c for c in columns if any(c == k or (k.endswith("/") and c.startswith(k)) for k in HIGHER_IS_BETTER)]


def paired_difference(metric: str, reference: tuple[str, pd.Series], model: tuple[str, pd.Series]) -> PairedDifference:
    """Compare two per-case series indexed by subject ID on the subjects both have a finite value for."""
    (ref_name, a), (name, b) = reference, model
    both = pd.concat([a.rename("a"), b.rename("b")], axis=1, join="inner").astype(float).dropna()
    diff = (both["b"] - both["a"]).to_numpy()
    higher = next(v for k, v in HIGHER_IS_BETTER.items() if metric == k or metric.startswith(k))
    n = len(diff)
    low = high = p = math.nan
    if n >= 2:
        if np.ptp(diff) > 0:
            interval = stats.bootstrap((diff,), np.mean, n_resamples=RESAMPLES, method="percentile",
                                       random_state=np.random.default_rng(0)).confidence_interval
            low, high = float(interval.low), float(interval.high)
        else:
            low = high = float(diff[0])
        p = float(stats.wilcoxon(diff).pvalue) if np.any(diff != 0) else 1.0
    return PairedDifference(metric=metric, reference=ref_name, model=name, n=n,
                            reference_mean=float(both["a"].mean()) if n else math.nan,
                            model_mean=float(both["b"].mean()) if n else math.nan,
                            difference=float(diff.mean()) if n else math.nan, low=low, high=high, p=p,
                            higher_is_better=higher)


def compare(cases: dict[str, pd.DataFrame]) -> list[PairedDifference]:
    """Every model against the first, per shared per-case metric; ``cases``: name → ``cases.csv`` table."""
    names = list(cases)
    reference = names[0]
    base = cases[reference].set_index("subject_id")
    out = []
    for name in names[1:]:
        other = cases[name].set_index("subject_id")
        for metric in compared_columns([c for c in base.columns if c in other.columns]):
            out.append(paired_difference(metric, (reference, base[metric]), (name, other[metric])))
    return out
