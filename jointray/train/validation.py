"""Validation: per-case predictions gathered from every worker, then the metrics and the combined score."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from jointray.losses.ordinal import cdr_to_class
from jointray.metrics import concordance_index, ordinal_metrics, regression_metrics, segmentation_metrics
from jointray.models.joint import JointModel
from jointray.train.batches import ModelBatch


@torch.no_grad()
def predict_cases(model: JointModel, batches: Iterable[ModelBatch], cross: float, structures: dict[int, str],
                  spacing: tuple[float, float, float], autocast) -> list[dict[str, Any]]:
    """One record per validation case: segmentation metrics and outcome predictions with their targets."""
    model.eval()
    records = []
    for b in batches:
        with autocast():
            out = model(b.image, b.clinical, cross, b.voxel_volume)
        per_case: dict[str, Any] = {}
        if out.seg is not None and bool(b.targets.has_label.any()):
            seg = segmentation_metrics(out.seg[0].float().argmax(1).cpu(), b.targets.label.cpu(), structures, spacing)
            per_case |= {k: v.tolist() for k, v in seg.items()}
        for name in ("mmse", "risk"):
            if name in out.outcomes:
                per_case[f"pred_{name}"] = out.outcomes[name].float().cpu().tolist()
        if "cdr" in out.outcomes:
            per_case["pred_cdr"] = (out.outcomes["cdr"].float() > 0).sum(-1).cpu().tolist()
        for i in range(b.size):
            record = {"subject_id": b.subject_ids[i], "has_label": bool(b.targets.has_label[i])}
            record |= {k: v[i] for k, v in per_case.items()}
            for name in ("mmse", "cdr", "time", "event"):
                record[name] = float(getattr(b.targets, name)[i])
            records.append(record)
    return records


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


def combined_score(metrics: dict[str, float], weights: dict[str, float]) -> float:
    """Σ weight · metric over the weighted metrics this run has (NaN metrics count as absent)."""
    present = {k: w for k, w in weights.items() if k in metrics and not math.isnan(metrics[k])}
    return float(sum(w * metrics[k] for k, w in present.items())) if present else math.nan
