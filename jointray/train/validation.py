"""Validation: per-case predictions on each worker, and the combined score of the gathered metrics
(:func:`jointray.metrics.cohort.validation_metrics`)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from jointray.losses.ordinal import coral_predict
from jointray.metrics import segmentation_metrics
from jointray.models.joint import JointModel
from jointray.train.batches import ModelBatch


@torch.no_grad()
def predict_cases(model: JointModel, batches: Iterable[ModelBatch], cross: float, structures: dict[int, str],
                  autocast) -> list[dict[str, Any]]:
    """One record per validation case: segmentation metrics and outcome predictions with their targets.

    Args:
        model: the joint model (unwrapped from DDP); put in eval mode here.
        batches: validation batches; each case's ``spacing`` (from its affine) puts HD95 in mm.
        cross: the cross-task strength of the current curriculum phase.
        structures: label → name of the structures to score.
        autocast: a factory of the autocast context for the training precision.

    Returns:
        Rows for :func:`jointray.metrics.cohort.validation_metrics`: ``subject_id``, ``has_label``, the
        targets, ``dice/``, ``iou/``, ``hd95/`` and ``missed/<structure>`` where the batch has
        a label, and ``pred_mmse``, ``pred_cdr``, ``pred_risk`` for the model's heads.
    """
    model.eval()
    records = []
    for b in batches:
        with autocast():
            out = model(b.image, b.clinical, cross, b.voxel_volume)
        per_case: dict[str, Any] = {}
        if out.seg is not None and bool(b.targets.has_label.any()):
            # HD95 is the one distance validation reports (validation_metrics); ASSD would double the cost.
            seg = segmentation_metrics(out.seg[0].float().argmax(1).cpu(), b.targets.label.cpu(), structures,
                                       b.spacing, distances=("hd95",))
            per_case |= {k: v.tolist() for k, v in seg.items()}
        for name in ("mmse", "risk"):
            if name in out.outcomes:
                per_case[f"pred_{name}"] = out.outcomes[name].float().cpu().tolist()
        if "cdr" in out.outcomes:
            per_case["pred_cdr"] = coral_predict(out.outcomes["cdr"].float()).cpu().tolist()
        for i in range(b.size):
            record = {"subject_id": b.subject_ids[i], "has_label": bool(b.targets.has_label[i])}
            record |= {k: v[i] for k, v in per_case.items()}
            for name in ("mmse", "cdr", "time", "event"):
                record[name] = float(getattr(b.targets, name)[i])
            records.append(record)
    return records


def combined_score(metrics: dict[str, float], weights: dict[str, float]) -> float:
    """Σ weight · metric over the weighted metrics this run has (NaN metrics count as absent)."""
    present = {k: w for k, w in weights.items() if k in metrics and not math.isnan(metrics[k])}
    return float(sum(w * metrics[k] for k, w in present.items())) if present else math.nan
