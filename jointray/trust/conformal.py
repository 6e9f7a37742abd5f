"""Split-conformal prediction: intervals for numbers and contiguous prediction sets for ordinal stages.

**Intervals** (Lei et al., "Distribution-free predictive inference for regression", JASA 2018;
normalised scores: Papadopoulos et al. 2008). On n calibration cases with truth y, point prediction ŷ
and the model's own spread σ (Monte Carlo or ensemble standard deviation), the score of a case is
``|y − ŷ| / σ``; the interval of a new case is ``ŷ ± q̂ · σ`` with q̂ the ⌈(n + 1)·level⌉-th smallest
score. If the new case and the calibration cases are exchangeable, the interval holds the truth with
probability at least ``level`` (marginal: over cases like the calibration cases, not for each case).
Normalising by σ gives easy cases narrow intervals and hard ones wide. Where σ is unavailable (one
deterministic pass, or Monte Carlo settings other than the calibration's) the plain score ``|y − ŷ|``
is used: the same guarantee, one width for all. σ is floored at a fraction of the calibration cases'
median σ (a case with no spread would otherwise get a point). Mondrian calibration (Vovk et al. 2005)
computes q̂ within each group (``bins``). The quantile itself is crepes' ``ConformalRegressor``
(Boström, crepes, PMLR 2022).

**Ordinal sets** (CDR): the score is ``1 − p(true stage)`` (Sadinle et al., "Least ambiguous set-valued
classifiers with bounded error levels", JASA 2019), a new case's set holds every stage whose score is
at most q̂ (crepes' ``ConformalClassifier``), then every stage between its lowest and highest, so the
set is contiguous; an empty set gets the most probable stage. Both only add stages, so coverage stays
at least ``level``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
from crepes import ConformalClassifier, ConformalRegressor

#: σ is floored at this fraction of the calibration cases' median σ.
SIGMA_FLOOR = 0.1
#: crepes truncates (1 − level)·(n + 1) in floating point: at 0.9 and n = 19 it computes 1.9999… → 1 and takes
#: the largest score (95 % coverage) instead of the 18th of 19 (90 %). Lowering the level by this much lands
#: the product on the right side of the integer; it moves no other case.
_ROUNDING = 1e-9


def _regressor(residuals: np.ndarray, sigmas: np.ndarray | None, bins: np.ndarray | None) -> ConformalRegressor:
    regressor = ConformalRegressor()
    regressor.fit(residuals, sigmas=sigmas, bins=bins)
    return regressor


@dataclass
class ConformalInterval:
    """A fitted split-conformal interval for one number (see the module docstring).

    ``residuals`` |y − ŷ| and ``sigmas`` (floored σ, or empty when the calibration had none) of the
    calibration cases; ``bins``: their Mondrian groups, or empty."""

    residuals: list[float]
    sigmas: list[float] = field(default_factory=list)
    bins: list[str] = field(default_factory=list)
    sigma_floor: float = 0.0

    @classmethod
    def fit(cls, truth, point, sigma=None, bins=None) -> ConformalInterval:
        """From calibration cases: truth and point predictions (n,), optional σ (n,) and groups (n,)."""
        truth, point = np.asarray(truth, np.float64), np.asarray(point, np.float64)
        keep = np.isfinite(truth) & np.isfinite(point)
        residuals = np.abs(truth - point)[keep]
        sigmas: list[float] = []
        floor = 0.0
        if sigma is not None:
            s = np.asarray(sigma, np.float64)[keep]
            floor = SIGMA_FLOOR * float(np.median(s)) if len(s) else 0.0
            if floor > 0:
                sigmas = np.maximum(s, floor).tolist()
        groups = [str(b) for b in np.asarray(bins)[keep]] if bins is not None else []
        return cls(residuals=residuals.tolist(), sigmas=sigmas, bins=groups, sigma_floor=floor)

    @property
    def cases(self) -> int:
        return len(self.residuals)

    @property
    def normalised(self) -> bool:
        return bool(self.sigmas)

    def interval(self, point, sigma=None, level: float = 0.9, bins=None, low: float = -math.inf,
                 high: float = math.inf) -> np.ndarray:
        """(m, 2) intervals at ``level`` for m new points; normalised where ``sigma`` is given (and the
        calibration had σ), plain otherwise. Infinite where the calibration cases are too few for the level."""
        point = np.atleast_1d(np.asarray(point, np.float64))
        use_sigma = sigma is not None and self.normalised
        residuals = np.asarray(self.residuals)
        groups = np.asarray(self.bins) if self.bins else None
        regressor = _regressor(residuals, np.asarray(self.sigmas) if use_sigma else None, groups)
        s = np.maximum(np.atleast_1d(np.asarray(sigma, np.float64)), self.sigma_floor) if use_sigma else None
        b = None if groups is None else np.atleast_1d(np.asarray(bins, dtype=str))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # too few cases for the level: crepes returns ±inf, which we keep
            return regressor.predict_int(point, sigmas=s, bins=b, confidence=level - _ROUNDING, y_min=low,
                                         y_max=high)


@dataclass
class OrdinalSet:
    """A fitted conformal prediction set over ordered classes; ``scores``: 1 − p(true class) of the
    calibration cases."""

    scores: list[float]

    @classmethod
    def fit(cls, probabilities, truth) -> OrdinalSet:
        """From calibration cases: class probabilities (n, K) and true classes (n,), −1 where unknown."""
        probabilities = np.asarray(probabilities, np.float64)
        truth = np.asarray(truth).astype(np.int64)
        known = truth >= 0
        return cls(scores=(1.0 - probabilities[known, truth[known]]).tolist())

    @property
    def cases(self) -> int:
        return len(self.scores)

    def sets(self, probabilities, level: float = 0.9) -> np.ndarray:
        """(m, K) boolean contiguous sets at ``level`` for m cases' class probabilities (m, K)."""
        probabilities = np.atleast_2d(np.asarray(probabilities, np.float64))
        classifier = ConformalClassifier()
        classifier.fit(np.asarray(self.scores))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            chosen = classifier.predict_set(1.0 - probabilities, confidence=level, smoothing=False).astype(bool)
        for row, p in zip(chosen, probabilities):
            if not row.any():
                row[int(np.argmax(p))] = True
            members = np.flatnonzero(row)
            row[members.min():members.max() + 1] = True
        return chosen
