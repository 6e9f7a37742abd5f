"""Cohort summaries of per-case metrics, skipping undefined (NaN) values.

Per-case metrics are dicts of (B,) columns (see :func:`jointray.metrics.segmentation_metrics`,
:func:`jointray.metrics.volume_metrics`); ``pandas.DataFrame({k: v.cpu().numpy() ...})`` turns
them into a per-case table. A NaN marks a value that does not exist for that case (e.g. a surface
distance when both prediction and reference are empty; a miss has a worst-case distance instead, see
:mod:`jointray.metrics.segmentation`), so summaries leave it out and report how many cases were used.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor


def summarize(per_case: Mapping[str, Tensor | np.ndarray]) -> dict[str, float]:
    """Mean, SD (n − 1 denominator) and count of the defined values of each metric.

    Args:
        per_case: metric name → (B,) values, NaN where undefined; columns from several batches may
            be concatenated first.

    Returns:
        ``{"<name>/mean", "<name>/sd", "<name>/n"}`` per metric; mean NaN when n = 0, SD NaN when
        n < 2.
    """
    summary: dict[str, float] = {}
    for name, values in per_case.items():
        column = torch.as_tensor(values, dtype=torch.float64).detach().cpu().reshape(-1).numpy()
        defined = column[~np.isnan(column)]
        n = len(defined)
        summary[f"{name}/mean"] = float(defined.mean()) if n else float("nan")
        summary[f"{name}/sd"] = float(defined.std(ddof=1)) if n >= 2 else float("nan")
        summary[f"{name}/n"] = n
    return summary
