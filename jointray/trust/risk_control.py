"""Conformal risk control of a review flag (Angelopoulos, Bates, Fisch, Lei, Schuster, "Conformal Risk
Control", ICLR 2024, arXiv:2208.02814).

A case is flagged for review when its quality estimate (predicted worst-structure Dice) is below a
threshold λ. A *miss* is a failure (true worst-structure Dice below the failure level) that is not
flagged: ``L_i(λ) = failure_i · 1[quality_i ≥ λ]``, bounded by B = 1 and non-increasing in λ. On n
calibration cases the threshold::

    λ̂ = inf { λ : n/(n+1) · R̂_n(λ) + 1/(n+1) ≤ α },   R̂_n(λ) = mean_i L_i(λ)

guarantees E[L_{n+1}(λ̂)] ≤ α for a new case exchangeable with them: **the probability that a case is
a failure and goes unflagged is at most α**. It bounds missed failures per case seen, not the share of
failures among the unflagged cases (that share is larger by 1 / (1 − flag rate)). Where no λ satisfies
the bound the threshold is +∞ (every case flagged): too few calibration cases for that α.
"""

from __future__ import annotations

import math

import numpy as np


def missed(quality: np.ndarray, failure: np.ndarray, threshold: float) -> np.ndarray:
    """Per case, 1.0 where it is a failure and its quality is at or above ``threshold`` (not flagged)."""
    return (np.asarray(failure, bool) & (np.asarray(quality, np.float64) >= threshold)).astype(np.float64)


def risk_control_threshold(quality, failure, alpha: float) -> float:
    """λ̂ of the module docstring: flag a new case when its quality is below it.

    Args:
        quality: (n,) quality estimates of the calibration cases (higher = better), out of sample.
        failure: (n,) whether each calibration case failed.
        alpha: the bound on the probability of a missed failure, in (0, 1).

    Returns:
        The smallest candidate λ (the calibration qualities, their next float up, and −∞) meeting the
        bound, or +∞ when none does.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    quality = np.asarray(quality, np.float64)
    failure = np.asarray(failure, bool)
    n = len(quality)
    if n == 0:
        return math.inf
    # R̂ only changes just above a failure's quality: those points and −∞ are every distinct λ worth testing.
    candidates = np.concatenate([[-math.inf], np.nextafter(np.sort(quality[failure]), math.inf)])
    for threshold in candidates:
        if n / (n + 1) * missed(quality, failure, threshold).mean() + 1 / (n + 1) <= alpha:
            return float(threshold)
    return math.inf


def risk_coverage(quality, dice) -> dict[str, np.ndarray | float]:
    """The risk–coverage curve of a quality estimate (Geifman & El-Yaniv 2017; for segmentation failure
    detection, Zenk et al., Medical Image Analysis 2025): cases kept in order of decreasing quality,
    the risk at coverage c is the mean segmentation error (1 − Dice) of the kept ones.

    Returns:
        ``coverage`` (n,), ``risk`` (n,), ``aurc`` (the area under the curve, the mean over the n
        coverages) and ``optimal_aurc`` (the same with the cases ordered by their true Dice).
    """
    quality, error = np.asarray(quality, np.float64), 1.0 - np.asarray(dice, np.float64)
    n = len(quality)
    coverage = np.arange(1, n + 1) / n

    def curve(order: np.ndarray) -> np.ndarray:
        return np.cumsum(error[order]) / np.arange(1, n + 1)

    risk = curve(np.argsort(-quality, kind="stable"))
    return {"coverage": coverage, "risk": risk, "aurc": float(risk.mean()),
            "optimal_aurc": float(curve(np.argsort(error, kind="stable")).mean())}
