"""Inputs the model has no business answering: a conformal out-of-distribution test on a few image and
prediction statistics.

Each case is described by :data:`FEATURES` (first channel): of the input as it came (scale-free, so
another scanner's intensity units do not matter) ``negative_fraction`` (an MR magnitude image has
none; a CT in Hounsfield units is mostly air at −1000), ``background_fraction`` (voxels at the
image's minimum: an empty field of view), ``smoothness`` (the mean correlation of neighbouring voxels
along the three axes: near 0 for noise, near 1 for anatomy), ``skewness`` and the 5th/95th
percentiles of the z-scored intensities (an inverted or T2-like contrast moves them); of the
prediction ``foreground_fraction`` (the share of the input the structures take) and ``expected_dice``
(the worst structure's, :mod:`jointray.trust.quality`: a crop of another region gets no confident
structure).

Each feature is standardised robustly on the calibration cases (median, 1.4826·MAD); a case's score
is its largest absolute standardised value, and its conformal p-value is ``(1 + #{calibration scores
≥ score}) / (n + 1)`` (Bates et al., "Testing for outliers with conformal p-values", Ann. Statist.
2023). Flagging when p ≤ α flags an input exchangeable with the calibration cases with probability at
most α (marginally); what it catches of other inputs is measured, not promised. The calibration
scores are cross-fitted (each case scored by statistics fitted without it), so they are out of sample
as a new case's are. The reason names the feature furthest out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FEATURES = ("negative_fraction", "background_fraction", "smoothness", "skewness", "p05", "p95",
            "foreground_fraction", "expected_dice")
#: MAD → SD of a normal distribution.
_MAD_SD = 1.4826


def feature_key(feature: str) -> str:
    return f"ood_feature/{feature}"


def image_features(original: np.ndarray) -> dict[str, float]:
    """The input statistics of :data:`FEATURES` of an image (X, Y, Z) as it came."""
    image = np.asarray(original, np.float64)
    size = image.size
    spread = image.std()
    z = (image - image.mean()) / spread if spread > 0 else np.zeros_like(image)
    correlations = []
    for axis in range(3):
        if image.shape[axis] > 1 and spread > 0:
            a = np.moveaxis(z, axis, 0)
            correlations.append(float((a[1:] * a[:-1]).mean()))
    p05, p95 = np.percentile(z, [5, 95])
    return {"negative_fraction": float((image < 0).sum() / size),
            "background_fraction": float((image <= image.min()).sum() / size),
            "smoothness": float(np.mean(correlations)) if correlations else 0.0,
            "skewness": float((z ** 3).mean()), "p05": float(p05), "p95": float(p95)}


def _robust(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    median = np.nanmedian(features, axis=0)
    mad = _MAD_SD * np.nanmedian(np.abs(features - median), axis=0)
    # A feature constant over the calibration cases (no negatives in any MR image) gets a scale of
    # 1 % of its typical magnitude, at least 1e-3: any departure from it is far out.
    floor = np.maximum(0.01 * np.abs(median), 1e-3)
    return median, np.maximum(mad, floor)


@dataclass
class OutlierTest:
    """``median`` and ``scale`` per feature and the cross-fitted ``scores`` of the calibration cases."""

    median: list[float]
    scale: list[float]
    scores: list[float]

    @classmethod
    def fit(cls, features: np.ndarray, folds: int = 5, seed: int = 0) -> OutlierTest:
        """From (n, F) features of calibration cases (NaN: unknown, ignored)."""
        features = np.asarray(features, np.float64)
        n = len(features)
        fold_of = np.random.default_rng(seed).permutation(n) % max(1, min(folds, n))
        scores = np.zeros(n)
        for fold in np.unique(fold_of):
            held = fold_of == fold
            median, scale = _robust(features[~held] if (~held).any() else features)
            scores[held] = _scores(features[held], median, scale)
        median, scale = _robust(features)
        return cls(median=median.tolist(), scale=scale.tolist(), scores=scores.tolist())

    def deviations(self, features: np.ndarray) -> np.ndarray:
        """(..., F) robust standardised deviations; NaN features count as 0."""
        z = (np.asarray(features, np.float64) - np.asarray(self.median)) / np.asarray(self.scale)
        return np.nan_to_num(z, nan=0.0)

    def p_value(self, features: np.ndarray) -> float:
        """The conformal p-value of one case's (F,) features."""
        score = float(np.abs(self.deviations(features)).max())
        return (1 + sum(s >= score for s in self.scores)) / (len(self.scores) + 1)

    def reason(self, features: np.ndarray) -> str:
        """The feature furthest from the calibration cases, in words."""
        z = self.deviations(features)
        i = int(np.argmax(np.abs(z)))
        return (f"{FEATURES[i]} {float(np.asarray(features)[i]):.3g} is {abs(z[i]):.1f} robust SDs "
                f"{'above' if z[i] > 0 else 'below'} the calibration cases' {self.median[i]:.3g}")


def _scores(features: np.ndarray, median: np.ndarray, scale: np.ndarray) -> np.ndarray:
    z = np.nan_to_num((features - median) / scale, nan=0.0)
    return np.abs(z).max(axis=1) if len(z) else np.zeros(0)

