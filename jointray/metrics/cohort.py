"""Cohort metrics from per-case rows: what validation reports each epoch and ``evaluate`` reports once.

A row is a dict with ``has_label``, ``dice/<structure>``, ``hd95/<structure>`` (labelled cases),
``pred_mmse``, ``pred_cdr`` (class index), ``pred_risk`` and the targets ``mmse``, ``cdr``, ``time``,
``event`` (NaN where missing); the training loop and :mod:`jointray.inference` both build such rows.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from jointray.losses.ordinal import cdr_to_class
from jointray.metrics.ordinal import ordinal_metrics
from jointray.metrics.regression import regression_metrics
from jointray.metrics.survival import concordance_index


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def validation_metrics(records: list[dict[str, Any]], structures: dict[int, str], cdr_classes: int) -> dict[str, float]:
    """Metrics over all validation cases (records from every worker)."""
    metrics: dict[str, float] = {"val/cases": float(len(records))}
    labelled = [r for r in records if r["has_label"] and f"dice/{next(iter(structures.values()))}" in r]
    if labelled:
        for name in structures.values():
            metrics[f"val/dice/{name}"] = _mean([r[f"dice/{name}"] for r in labelled])
            metrics[f"val/hd95/{name}"] = _mean([r[f"hd95/{name}"] for r in labelled])
        metrics["val/dice"] = _mean([metrics[f"val/dice/{n}"] for n in structures.values()])
    if records and "pred_mmse" in records[0]:
        reg = regression_metrics(torch.tensor([r["pred_mmse"] for r in records]),
                                 torch.tensor([r["mmse"] for r in records]))
        if reg["n"] > 0:
            metrics |= {"val/mmse_mae": reg["mae"], "val/mmse_rmse": reg["rmse"], "val/mmse_r2": reg["r2"]}
    if records and "pred_cdr" in records[0]:
        target = cdr_to_class(torch.tensor([r["cdr"] for r in records]), cdr_classes)
        ordinal = ordinal_metrics(torch.tensor([r["pred_cdr"] for r in records]), target, cdr_classes)
        if ordinal["n"] > 0:
            metrics |= {"val/cdr_accuracy": ordinal["accuracy"], "val/cdr_qwk": ordinal["qwk"]}
    if records and "pred_risk" in records[0]:
        known = [r for r in records if not math.isnan(r["time"]) and not math.isnan(r["event"])]
        if sum(r["event"] for r in known) >= 1 and len(known) >= 2:
            metrics["val/c_index"] = concordance_index(torch.tensor([r["pred_risk"] for r in known]),
                                                       torch.tensor([r["time"] for r in known]),
                                                       torch.tensor([r["event"] for r in known]))
    return metrics
