"""Calibration: expected calibration error for class and voxel probabilities, and predictive-interval coverage.

**Expected calibration error (ECE)** is torchmetrics' top-label ``MulticlassCalibrationError(n_bins,
norm="l1")``: each prediction's confidence is its largest class probability, correct when that class
is the target; confidences are binned with ``torch.bucketize`` on ``linspace(0, 1, n_bins + 1)``,
bins closed on the left, [b_i, b_{i+1}) (a confidence of exactly 1 gets a bin of its own), and::

    ECE = Σ_bins (count_bin / N) · |accuracy_bin − mean confidence_bin|

Guo C., Pleiss G., Sun Y., Weinberger K.Q., "On calibration of modern neural networks", ICML 2017.
For a segmentation every voxel is one prediction, pooled over the batch. A uniform random subset of
voxels may be drawn to bound memory: each bin's accuracy and confidence are then unbiased
estimates, while the ECE, a sum of absolute differences, is biased upwards when bins hold few
voxels (negligible at 10⁵ voxels or more).

**Reliability bins** (:func:`reliability_bins`) hold, per bin, the count, the sum of confidences and
the number correct: bins of separate cases add up, so a cohort's reliability diagram and ECE
(:func:`bins_calibration_error`) come from every voxel of every case without keeping the voxels, and
equal torchmetrics' ECE of all of them pooled.

**Coverage** of Monte Carlo predictive intervals: from T samples per subject (e.g. MC dropout), the
central interval at level q runs from the (1 − q)/2 to the (1 + q)/2 sample quantile (linear
interpolation, ``torch.quantile``); coverage is the fraction of targets inside it (bounds included)
and the mean width its average length. Empirical quantiles of few samples give intervals slightly
too narrow, so T should be in the hundreds for q = 0.9.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torchmetrics.functional.classification import multiclass_calibration_error

from jointray.metrics.ordinal import MISSING


def class_calibration_error(probs: Tensor, target: Tensor, n_bins: int = 15) -> float:
    """Top-label ECE (L1) of class probabilities, e.g. CDR stages.

    Args:
        probs: (B, K) class probabilities (rows sum to 1; logits are soft-maxed by torchmetrics).
        target: (B,) integer classes in 0..K−1, ``MISSING`` (−1) where unknown.
        n_bins: number of equal-width confidence bins.

    Returns:
        ECE in [0, 1]; NaN when no target is present.
    """
    probs = torch.as_tensor(probs)
    target = torch.as_tensor(target, device=probs.device).long().reshape(-1)
    if probs.ndim != 2 or probs.shape[0] != target.shape[0]:
        raise ValueError(f"probs must be (B, K) and target (B,), got {tuple(probs.shape)} and {tuple(target.shape)}")
    present = target != MISSING
    if not bool(present.any()):
        return float("nan")
    return float(multiclass_calibration_error(probs[present], target[present], probs.shape[1], n_bins, norm="l1"))


#: Rows of :func:`reliability_bins`' array.
BIN_COUNT, BIN_CONFIDENCE, BIN_CORRECT = 0, 1, 2


def reliability_bins(probs: Tensor, target: Tensor, n_bins: int = 15) -> np.ndarray:
    """Per-bin sums of a reliability diagram, binned exactly as :func:`class_calibration_error` bins.

    Args:
        probs: (N, K) class probabilities, one row per prediction (a voxel, a subject).
        target: (N,) integer classes in 0..K−1, ``MISSING`` (−1) where unknown (left out).
        n_bins: number of equal-width confidence bins.

    Returns:
        (3, n_bins + 1) float64: rows :data:`BIN_COUNT`, :data:`BIN_CONFIDENCE` (sum of top-label
        confidences) and :data:`BIN_CORRECT` (predictions whose top label is the target); the last
        column holds the confidences of exactly 1 (torchmetrics' bucketing). Arrays of separate
        predictions add up.
    """
    probs = torch.as_tensor(probs)
    target = torch.as_tensor(target, device=probs.device).long().reshape(-1)
    if probs.ndim != 2 or probs.shape[0] != target.shape[0]:
        raise ValueError(f"probs must be (N, K) and target (N,), got {tuple(probs.shape)} and {tuple(target.shape)}")
    present = target != MISSING
    confidence, predicted = probs[present].max(dim=1)
    correct = (predicted == target[present]).to(confidence.dtype)
    boundaries = torch.linspace(0, 1, n_bins + 1, dtype=confidence.dtype, device=confidence.device)
    index = torch.bucketize(confidence, boundaries, right=True) - 1
    bins = torch.zeros(3, n_bins + 1, dtype=torch.float64, device=confidence.device)
    for row, values in ((BIN_COUNT, torch.ones_like(confidence)), (BIN_CONFIDENCE, confidence), (BIN_CORRECT, correct)):
        bins[row].scatter_add_(0, index, values.double())
    return bins.cpu().numpy()


def bins_calibration_error(bins: np.ndarray) -> float:
    """Top-label ECE (L1) from :func:`reliability_bins` sums: Σ_bins |correct − confidence sum| / N; NaN
    when the bins are empty."""
    bins = np.asarray(bins, dtype=np.float64)
    total = bins[BIN_COUNT].sum()
    return float(np.abs(bins[BIN_CORRECT] - bins[BIN_CONFIDENCE]).sum() / total) if total > 0 else math.nan


def flatten_voxels(
    probs: Tensor, target: Tensor, max_voxels: int | None = None, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Voxels as independent predictions: (B, K, X, Y, Z) and (B, X, Y, Z) → (N, K) and (N,).

    Args:
        probs: per-voxel class probabilities (soft-max output).
        target: reference label map, integer classes 0..K−1.
        max_voxels: keep at most this many voxels, drawn uniformly without replacement; all if None.
        generator: random generator for the draw, for reproducible subsets.

    Returns:
        (N, K) probabilities and (N,) labels, N = min(B·X·Y·Z, max_voxels). Collecting these per
        case and concatenating gives a cohort-level ECE with bounded memory.
    """
    probs = torch.as_tensor(probs)
    target = torch.as_tensor(target, device=probs.device)
    if probs.ndim != 5 or target.shape != probs.shape[:1] + probs.shape[2:]:
        raise ValueError(
            f"probs must be (B, K, X, Y, Z) and target (B, X, Y, Z), got {tuple(probs.shape)} and {tuple(target.shape)}"
        )
    flat_probs = probs.movedim(1, -1).reshape(-1, probs.shape[1])
    flat_target = target.reshape(-1).long()
    if max_voxels is not None and flat_target.numel() > max_voxels:
        keep = torch.randperm(flat_target.numel(), generator=generator)[:max_voxels].to(probs.device)
        flat_probs, flat_target = flat_probs[keep], flat_target[keep]
    return flat_probs, flat_target


def voxel_calibration_error(
    probs: Tensor,
    target: Tensor,
    n_bins: int = 15,
    max_voxels: int | None = None,
    generator: torch.Generator | None = None,
) -> float:
    """Top-label ECE (L1) of a segmentation, every voxel of the batch one prediction.

    Args:
        probs: (B, K, X, Y, Z) per-voxel class probabilities.
        target: (B, X, Y, Z) reference label map.
        n_bins: number of equal-width confidence bins.
        max_voxels, generator: optional uniform voxel subsample, see :func:`flatten_voxels`.

    Returns:
        ECE in [0, 1].
    """
    flat_probs, flat_target = flatten_voxels(probs, target, max_voxels, generator)
    return class_calibration_error(flat_probs, flat_target, n_bins)


def predictive_interval(samples: Tensor, level: float = 0.9) -> tuple[Tensor, Tensor]:
    """Central interval at ``level`` from Monte Carlo samples: (T, B) → lower (B,), upper (B,)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    samples = torch.as_tensor(samples, dtype=torch.float64)
    if samples.ndim != 2:
        raise ValueError(f"samples must be (T, B), got shape {tuple(samples.shape)}")
    tails = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64, device=samples.device)
    lower, upper = torch.quantile(samples, tails, dim=0)
    return lower, upper


@dataclass(frozen=True)
class IntervalCoverage:
    """How often, and with how wide an interval, the central predictive interval holds the target."""

    coverage: float  # fraction of targets inside [lower, upper]; ideally ≈ level
    mean_width: float  # mean of upper − lower, in the target's units
    n: int  # subjects with a target


def interval_coverage(samples: Tensor, target: Tensor, level: float = 0.9) -> IntervalCoverage:
    """Coverage and mean width of the central ``level`` interval of Monte Carlo samples.

    Args:
        samples: (T, B) predictions, T Monte Carlo draws for each of B subjects.
        target: (B,) targets, NaN where missing (left out).
        level: nominal coverage q of the interval, in (0, 1).

    Returns:
        :class:`IntervalCoverage`; coverage and width NaN when no target is present.
    """
    lower, upper = predictive_interval(samples, level)
    target = torch.as_tensor(target, dtype=torch.float64, device=lower.device).reshape(-1)
    if target.shape != lower.shape:
        raise ValueError(f"samples (T, B) and target (B,) disagree: B = {lower.shape[0]} vs {target.shape[0]}")
    present = ~torch.isnan(target)
    n = int(present.sum())
    if n == 0:
        return IntervalCoverage(coverage=float("nan"), mean_width=float("nan"), n=0)
    lower, upper, target = lower[present], upper[present], target[present]
    inside = (lower <= target) & (target <= upper)
    return IntervalCoverage(coverage=float(inside.double().mean()), mean_width=float((upper - lower).mean()), n=n)
