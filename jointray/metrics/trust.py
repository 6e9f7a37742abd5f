"""Whether the model's uncertainty means something, from the per-case rows of ``evaluate``.

* **Uncertainty against error**: per labelled case, the mean predictive entropy inside the predicted
  structures (the mean over structures of ``entropy/<name>``) against the segmentation error
  1 − mean Dice; Spearman's ρ (``scipy.stats.spearmanr``) says whether more uncertain cases are the
  worse ones. Cases where no structure was predicted have no entropy inside one and are left out
  (the review flag catches them: "not found").
* **The review flag** (``needs_review``, :meth:`jointray.inference.predictor.Predictor.review`): the
  fraction of cases it flags, and its recall of the worst-Dice decile (the ⌈n/10⌉ labelled cases with
  the lowest mean Dice): a flag that sends a tenth of the cases to a person should catch the bad ones.
* **Interval coverage** of the MMSE predictions: how often the Monte Carlo interval
  (``pred_mmse_low``, ``pred_mmse_high``) holds the true score, against its nominal level.
* **CDR calibration**: top-label ECE of the predicted stage probabilities (``prob_cdr/<stage>``).

Each figure is NaN where the rows lack what it needs (no labels, no MC intervals, no CDR head).
Kendall M.G., "Rank correlation methods" (Spearman's ρ); Guo et al. ICML 2017 (ECE).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from scipy import stats

from jointray.losses.ordinal import cdr_to_class
from jointray.metrics.calibration import bins_calibration_error, reliability_bins

CDR_PREFIX = "prob_cdr/"


def _finite_mean(row: dict[str, Any], keys: list[str]) -> float:
    finite = [v for v in (row.get(k) for k in keys) if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def case_uncertainty(row: dict[str, Any], names: list[str]) -> float:
    """Mean of the finite ``entropy/<name>`` of a row (nats); NaN when no structure was predicted."""
    return _finite_mean(row, [f"entropy/{n}" for n in names])


def case_dice(row: dict[str, Any], names: list[str]) -> float:
    """Mean Dice over the structures of a labelled row (NaN-aware); NaN when unlabelled."""
    return _finite_mean(row, [f"dice/{n}" for n in names])


def worst_decile(dice: np.ndarray) -> np.ndarray:
    """Indices of the ⌈n/10⌉ lowest values of ``dice`` (ties broken by position: a stable sort)."""
    return np.argsort(dice, kind="stable")[:math.ceil(len(dice) / 10)]


def uncertainty_and_review(rows: list[dict[str, Any]], structures: dict[int, str]) -> dict[str, float]:
    """``uncertainty_error_spearman`` (ρ), ``uncertainty_error_p`` and ``uncertainty_error_cases``;
    ``review_fraction`` (over rows with ``needs_review``), ``review_recall_worst_decile`` and
    ``worst_decile_cases`` (over labelled rows with ``needs_review``)."""
    names = list(structures.values())
    metrics: dict[str, float] = {}
    labelled = [r for r in rows if r.get("has_label") and f"dice/{names[0]}" in r]
    pairs = np.array([(case_uncertainty(r, names), 1 - case_dice(r, names)) for r in labelled]).reshape(-1, 2)
    pairs = pairs[np.isfinite(pairs).all(axis=1)]
    metrics["uncertainty_error_cases"] = float(len(pairs))
    rho = p = math.nan
    if len(pairs) >= 3 and np.ptp(pairs[:, 0]) > 0 and np.ptp(pairs[:, 1]) > 0:
        rho, p = (float(v) for v in stats.spearmanr(pairs[:, 0], pairs[:, 1]))
    metrics |= {"uncertainty_error_spearman": rho, "uncertainty_error_p": p}
    flagged = [r for r in rows if "needs_review" in r]
    if flagged:
        metrics["review_fraction"] = float(np.mean([bool(r["needs_review"]) for r in flagged]))
        scored = [r for r in flagged if r.get("has_label") and math.isfinite(case_dice(r, names))]
        if scored:
            worst = worst_decile(np.array([case_dice(r, names) for r in scored]))
            metrics["worst_decile_cases"] = float(len(worst))
            metrics["review_recall_worst_decile"] = float(np.mean([bool(scored[i]["needs_review"]) for i in worst]))
    return metrics


def mmse_interval_coverage(rows: list[dict[str, Any]]) -> dict[str, float]:
    """``mmse_interval_coverage`` (share of true scores inside [low, high], bounds included),
    ``mmse_interval_width`` (mean high − low) and ``mmse_interval_cases``, over rows with an interval and
    a true MMSE."""
    known = [r for r in rows if "pred_mmse_low" in r and math.isfinite(r.get("mmse", math.nan))]
    if not known:
        return {}
    low, high, true = (np.array([r[k] for r in known], dtype=np.float64) for k in ("pred_mmse_low", "pred_mmse_high",
                                                                                   "mmse"))
    return {"mmse_interval_coverage": float(((low <= true) & (true <= high)).mean()),
            "mmse_interval_width": float((high - low).mean()), "mmse_interval_cases": float(len(known))}


def cdr_reliability(rows: list[dict[str, Any]], cdr_classes: int, n_bins: int = 10) -> np.ndarray | None:
    """:func:`~jointray.metrics.calibration.reliability_bins` of the CDR stage probabilities over the rows
    with a true CDR; None where the rows carry no ``prob_cdr/`` columns."""
    stages = sorted((k for k in (rows[0] if rows else {}) if k.startswith(CDR_PREFIX)),
                    key=lambda k: float(k.removeprefix(CDR_PREFIX)))
    known = [r for r in rows if stages and math.isfinite(r.get("cdr", math.nan))]
    if not known:
        return None
    probs = torch.tensor([[r[k] for k in stages] for r in known], dtype=torch.float64)
    target = cdr_to_class(torch.tensor([r["cdr"] for r in known]), cdr_classes)
    return reliability_bins(probs, target, n_bins)


def trust_metrics(rows: list[dict[str, Any]], structures: dict[int, str], cdr_classes: int) -> dict[str, float]:
    """Everything above as one dict (keys as in the functions; ``cdr_ece`` from :func:`cdr_reliability`)."""
    metrics = uncertainty_and_review(rows, structures) if structures else {}
    metrics |= mmse_interval_coverage(rows)
    bins = cdr_reliability(rows, cdr_classes)
    if bins is not None:
        metrics["cdr_ece"] = bins_calibration_error(bins)
    return metrics
