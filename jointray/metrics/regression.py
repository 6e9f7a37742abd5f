"""Regression metrics for a score such as MMSE: MAE, RMSE, R² and Pearson r, via torchmetrics.

Subjects whose target is NaN (missing) are left out; predictions are never NaN for a subject with
an image, so a NaN prediction is an error upstream and propagates. Computed in float64.

Undefined cases: with no complete subject every metric is NaN; with one, R² and Pearson r are NaN.
With a constant target torchmetrics returns R² = 0 and Pearson r = NaN (zero variance, with a
warning).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.functional import mean_absolute_error, mean_squared_error, pearson_corrcoef, r2_score


def regression_metrics(pred: Tensor, target: Tensor) -> dict[str, float]:
    """MAE, RMSE, R² (coefficient of determination) and Pearson r over subjects with a target.

    Args:
        pred: (B,) predictions.
        target: (B,) targets, NaN where missing.

    Returns:
        ``{"mae", "rmse", "r2", "pearson", "n"}``; ``n`` counts the subjects used.
    """
    pred = torch.as_tensor(pred, dtype=torch.float64).reshape(-1)
    target = torch.as_tensor(target, dtype=torch.float64, device=pred.device).reshape(-1)
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same length")
    present = ~torch.isnan(target)
    pred, target = pred[present], target[present]
    n = int(present.sum())
    nan = float("nan")
    if n == 0:
        return {"mae": nan, "rmse": nan, "r2": nan, "pearson": nan, "n": 0}
    return {
        "mae": float(mean_absolute_error(pred, target)),
        "rmse": float(mean_squared_error(pred, target, squared=False)),
        # torchmetrics raises below two samples, where both are undefined anyway.
        "r2": float(r2_score(pred, target)) if n >= 2 else nan,
        "pearson": float(pearson_corrcoef(pred, target)) if n >= 2 else nan,
        "n": n,
    }
