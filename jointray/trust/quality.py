"""Predicted Dice: a per-structure quality estimate from the model's aggregated uncertainty.

Per predicted structure, a case carries :data:`FEATURES` (computed by the inference core,
:meth:`jointray.inference.predictor.Predictor.finish`):

* ``expected_dice``: the Dice that the calibrated probabilities expect of their own mask,
  ``2 Σ_{v ∈ mask} p(v) / (Σ_v p(v) + |mask|)`` (Jungo & Reyes, MICCAI 2019, and Roy et al.,
  NeuroImage 2019, aggregate voxel uncertainty into a case score this way);
* ``entropy``, ``mutual_information``: their means inside the structure (nats);
* ``disagreement``: 1 − the mean Dice between each Monte Carlo sample's mask and the point mask
  (0 with one pass);
* ``volume_cv``: the Monte Carlo volume SD over its mean (0 with one pass);
* ``log_volume``: the log of the predicted volume (mm³): a small structure has more of itself at its
  border, so the same border error costs it more Dice.

A ridge regression on the standardised features, shared by the structures, maps them to Dice
(clipped to [0, 1]); it is fitted on held-back cases. A case's quality is its worst structure's
predicted Dice, the figure the review flag thresholds (:mod:`jointray.trust.risk_control`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

FEATURES = ("expected_dice", "entropy", "mutual_information", "disagreement", "volume_cv", "log_volume")
#: Ridge penalty on the standardised coefficients: a few dozen cases fit six numbers.
RIDGE = 1.0


def feature_key(structure: str, feature: str) -> str:
    """The per-case row key of one structure's quality feature."""
    return f"quality_feature/{structure}/{feature}"


def features_of(row: dict, structures: list[str]) -> np.ndarray:
    """(S, F) features of a row's structures; NaN where a structure was not predicted."""
    return np.array([[row.get(feature_key(s, f), math.nan) for f in FEATURES] for s in structures], np.float64)


@dataclass
class QualityModel:
    """``mean``/``std`` standardise the features, ``coef`` and ``intercept`` map them to Dice."""

    mean: list[float]
    std: list[float]
    coef: list[float]
    intercept: float

    @classmethod
    def fit(cls, features: np.ndarray, dice: np.ndarray) -> QualityModel:
        """From (n, F) features and (n,) true Dice of held-back (case, structure) pairs; NaN rows are left out."""
        features, dice = np.asarray(features, np.float64), np.asarray(dice, np.float64)
        keep = np.isfinite(features).all(axis=1) & np.isfinite(dice)
        x, y = features[keep], dice[keep]
        if len(y) < 2:
            raise ValueError(f"a quality model needs at least 2 labelled structures with features, got {len(y)}")
        mean, std = x.mean(0), x.std(0)
        std = np.where(std > 0, std, 1.0)
        z = (x - mean) / std
        coef = np.linalg.solve(z.T @ z + RIDGE * np.eye(z.shape[1]), z.T @ (y - y.mean()))
        return cls(mean=mean.tolist(), std=std.tolist(), coef=coef.tolist(), intercept=float(y.mean()))

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Predicted Dice in [0, 1] for (..., F) features; NaN features (a structure not found) give 0."""
        features = np.asarray(features, np.float64)
        z = (features - np.asarray(self.mean)) / np.asarray(self.std)
        dice = np.clip(z @ np.asarray(self.coef) + self.intercept, 0.0, 1.0)
        return np.where(np.isfinite(features).all(axis=-1), dice, 0.0)


def out_of_fold(features: np.ndarray, dice: np.ndarray, folds: int = 5, seed: int = 0) -> np.ndarray:
    """Predicted Dice of every case by a model fitted without it (``folds``-fold cross-fitting over cases).

    Args:
        features: (n, S, F) per case and structure; dice: (n, S) true Dice.

    Returns:
        (n, S) out-of-fold predictions: the scores a conformal procedure may be calibrated on.
    """
    n = features.shape[0]
    fold_of = np.random.default_rng(seed).permutation(n) % min(folds, n)
    predicted = np.zeros(dice.shape, np.float64)
    for fold in range(min(folds, n)):
        held = fold_of == fold
        model = QualityModel.fit(features[~held].reshape(-1, features.shape[-1]), dice[~held].reshape(-1))
        predicted[held] = model.predict(features[held])
    return predicted
