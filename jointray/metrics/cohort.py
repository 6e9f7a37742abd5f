"""Cohort metrics from per-case rows: what validation reports each epoch and ``evaluate`` reports once.

A row is a dict with ``has_label``; on labelled cases ``dice/<structure>``, ``hd95/<structure>`` (mm)
and ``missed/<structure>`` (1 where the prediction is empty and the reference is not, see
:mod:`jointray.metrics.segmentation`); ``pred_mmse``, ``pred_cdr`` (class index) and ``pred_risk``
where the model has those heads; the targets ``mmse``, ``cdr``, ``time``, ``event`` (NaN where
missing); and, from ``evaluate``, ``volume/<structure>`` and on labelled cases
``volume_ref/<structure>`` (mm³). The training loop and :mod:`jointray.inference` both build such
rows. Rows need not share their keys: a labelled and an unlabelled case differ, and each metric is
taken over the rows that have its inputs.
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
from jointray.metrics.volume import bland_altman, intraclass_correlation


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def validation_keys(structures: dict[int, str], segmentation: bool, heads: list[str]) -> list[str]:
    """Every key :func:`validation_metrics` can return for a model with these outputs, so that a caller
    can report each of them at every validation (NaN where this validation could not define it: a
    search that compares trials, or stops them early, must never meet a missing metric)."""
    keys = ["val/cases"]
    if segmentation:
        keys += [f"val/{m}/{name}" for name in structures.values() for m in ("dice", "hd95", "missed")]
        keys += ["val/dice", "val/missed"]
    per_head = {"mmse": ["mmse_mae", "mmse_rmse", "mmse_r2", "mmse_pearson"],
                "cdr": ["cdr_accuracy", "cdr_macro_f1", "cdr_qwk"], "risk": ["c_index"]}
    return keys + [f"val/{m}" for head in heads for m in per_head[head]]


def validation_metrics(records: list[dict[str, Any]], structures: dict[int, str], cdr_classes: int) -> dict[str, float]:
    """Metrics over all validation cases (records from every worker), each where its inputs exist.

    Args:
        records: per-case rows (module docstring).
        structures: label → name of the segmented structures.
        cdr_classes: K, the number of CDR classes of the model.

    Returns:
        ``val/cases``; per structure ``val/dice/<name>``, ``val/hd95/<name>`` (mm; a miss counts at its
        worst case, both-empty cases are left out) and ``val/missed/<name>`` (how many labelled cases
        have no predicted voxel of a structure their reference has), with ``val/dice`` and
        ``val/missed`` over the structures; ``val/mmse_mae``, ``val/mmse_rmse``, ``val/mmse_r2``,
        ``val/mmse_pearson``; ``val/cdr_accuracy``, ``val/cdr_macro_f1``, ``val/cdr_qwk``;
        ``val/c_index``.
    """
    metrics: dict[str, float] = {"val/cases": float(len(records))}
    labelled = [r for r in records if r["has_label"] and f"dice/{next(iter(structures.values()))}" in r]
    if labelled:
        for name in structures.values():
            metrics[f"val/dice/{name}"] = _mean([r[f"dice/{name}"] for r in labelled])
            metrics[f"val/hd95/{name}"] = _mean([r[f"hd95/{name}"] for r in labelled])
            metrics[f"val/missed/{name}"] = float(sum(r[f"missed/{name}"] for r in labelled))
        metrics["val/dice"] = _mean([metrics[f"val/dice/{n}"] for n in structures.values()])
        metrics["val/missed"] = float(sum(metrics[f"val/missed/{n}"] for n in structures.values()))
    scored = [r for r in records if "pred_mmse" in r]
    if scored:
        reg = regression_metrics(torch.tensor([r["pred_mmse"] for r in scored]),
                                 torch.tensor([r["mmse"] for r in scored]))
        if reg["n"] > 0:
            metrics |= {"val/mmse_mae": reg["mae"], "val/mmse_rmse": reg["rmse"], "val/mmse_r2": reg["r2"],
                        "val/mmse_pearson": reg["pearson"]}
    staged = [r for r in records if "pred_cdr" in r]
    if staged:
        target = cdr_to_class(torch.tensor([r["cdr"] for r in staged]), cdr_classes)
        ordinal = ordinal_metrics(torch.tensor([r["pred_cdr"] for r in staged]), target, cdr_classes)
        if ordinal["n"] > 0:
            metrics |= {"val/cdr_accuracy": ordinal["accuracy"], "val/cdr_macro_f1": ordinal["macro_f1"],
                        "val/cdr_qwk": ordinal["qwk"]}
    known = [r for r in records if "pred_risk" in r and not math.isnan(r["time"]) and not math.isnan(r["event"])]
    if sum(r["event"] for r in known) >= 1 and len(known) >= 2:
        metrics["val/c_index"] = concordance_index(torch.tensor([r["pred_risk"] for r in known]),
                                                   torch.tensor([r["time"] for r in known]),
                                                   torch.tensor([r["event"] for r in known]))
    return metrics


def volume_agreement(records: list[dict[str, Any]], structures: dict[int, str]) -> dict[str, float]:
    """Predicted against reference volumes over the rows that have both, per structure.

    Args:
        records: per-case rows with ``volume/<name>`` and, where labelled, ``volume_ref/<name>`` (mm³).
        structures: label → name.

    Returns:
        Per structure with at least one labelled row: ``volume_pairs/<name>`` (rows used),
        ``volume_abs_error_mm3/<name>`` (mean |pred − ref|), ``volume_rel_error/<name>`` (mean
        |pred − ref| / ref over references > 0), ``volume_icc/<name>`` (ICC(2,1), absolute agreement),
        ``volume_bias_mm3/<name>``, ``volume_loa_lower_mm3/<name>`` and ``volume_loa_upper_mm3/<name>``
        (Bland–Altman bias and 95 % limits of agreement of pred − ref); see
        :mod:`jointray.metrics.volume` for the definitions and where they are NaN.
    """
    metrics: dict[str, float] = {}
    for name in structures.values():
        pairs = [(r[f"volume/{name}"], r[f"volume_ref/{name}"]) for r in records if f"volume_ref/{name}" in r]
        if not pairs:
            continue
        pred, ref = np.array(pairs, dtype=np.float64).T
        error = np.abs(pred - ref)
        agreement = bland_altman(pred, ref)
        metrics |= {
            f"volume_pairs/{name}": float(len(pairs)),
            f"volume_abs_error_mm3/{name}": float(error.mean()),
            f"volume_rel_error/{name}": float((error[ref > 0] / ref[ref > 0]).mean()) if (ref > 0).any() else math.nan,
            f"volume_icc/{name}": intraclass_correlation(pred, ref),
            f"volume_bias_mm3/{name}": agreement.bias,
            f"volume_loa_lower_mm3/{name}": agreement.lower,
            f"volume_loa_upper_mm3/{name}": agreement.upper,
        }
    return metrics
