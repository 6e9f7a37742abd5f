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
* **CDR calibration**: top-label ECE of the predicted stage probabilities (``prob_cdr/<stage>``), and the
  coverage and mean size of a calibrated model's conformal stage sets (``cdr_set``).
* **Volume intervals**: per structure, how often [``volume_low/``, ``volume_high/``] holds the reference
  volume, and the mean width.
* **Predicted Dice** (a calibrated model, :mod:`jointray.trust.quality`): against the true worst-structure
  Dice, the failure-detection AUROC (failure: worst Dice below ``failure_dice``; ``roc_auc_score`` of the
  negated prediction), the risk–coverage curve's AURC and its optimum
  (:func:`jointray.trust.risk_control.risk_coverage`), the mean absolute error of the prediction, and the
  flag's **missed-failure rate**: the share of cases that failed and were not flagged, the figure that
  conformal risk control bounds; and the share flagged as out of distribution (``ood_fraction``).

Each figure is NaN where the rows lack what it needs (no labels, no MC intervals, no CDR head).
Kendall M.G., "Rank correlation methods" (Spearman's ρ); Guo et al. ICML 2017 (ECE).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from scipy import stats
from sklearn.metrics import roc_auc_score

from jointray.losses.ordinal import cdr_to_class, class_to_cdr
from jointray.metrics.calibration import bins_calibration_error, reliability_bins
from jointray.trust.risk_control import risk_coverage

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


def volume_interval_coverage(rows: list[dict[str, Any]], names: list[str]) -> dict[str, float]:
    """Per structure ``volume_interval_coverage/<name>`` and ``volume_interval_width/<name>`` (mm³) over rows
    with an interval and a reference volume."""
    metrics: dict[str, float] = {}
    for name in names:
        known = [r for r in rows if f"volume_low/{name}" in r and math.isfinite(r.get(f"volume_ref/{name}", math.nan))]
        if known:
            low, high, true = (np.array([r[k] for r in known], np.float64)
                               for k in (f"volume_low/{name}", f"volume_high/{name}", f"volume_ref/{name}"))
            metrics[f"volume_interval_coverage/{name}"] = float(((low <= true) & (true <= high)).mean())
            metrics[f"volume_interval_width/{name}"] = float((high - low).mean())
    return metrics


def cdr_set_coverage(rows: list[dict[str, Any]], cdr_classes: int) -> dict[str, float]:
    """``cdr_set_coverage`` and ``cdr_set_size`` (mean stages per set) over rows with a set and a true CDR; a
    true stage above the head's last class counts as that class (CDR 3 as the "2" of four classes)."""
    known = [r for r in rows if isinstance(r.get("cdr_set"), str) and math.isfinite(r.get("cdr", math.nan))]
    if not known:
        return {}
    sets = [r["cdr_set"].split("|") for r in known]
    truth = class_to_cdr(cdr_to_class(torch.tensor([r["cdr"] for r in known]), cdr_classes)).tolist()
    return {"cdr_set_coverage": float(np.mean([f"{t:g}" in s for t, s in zip(truth, sets)])),
            "cdr_set_size": float(np.mean([len(s) for s in sets]))}


def quality_and_flag(rows: list[dict[str, Any]], names: list[str], failure_dice: float = 0.8) -> dict[str, float]:
    """The predicted Dice and the review flag against the truth, over labelled rows with ``predicted_dice/``
    (see the module docstring): ``predicted_dice_mae``, ``failure_auroc`` (NaN without both outcomes),
    ``aurc``, ``aurc_optimal``, ``failures``, ``missed_failure_rate``, and ``ood_fraction`` over every row
    with an ``ood_p``."""
    metrics: dict[str, float] = {}
    scored = [r for r in rows if f"predicted_dice/{names[0]}" in r and f"dice/{names[0]}" in r]
    if scored:
        predicted = np.array([min(r[f"predicted_dice/{n}"] for n in names) for r in scored], np.float64)
        true = np.array([min(r[f"dice/{n}"] for n in names) for r in scored], np.float64)
        failed = true < failure_dice
        curve = risk_coverage(predicted, true)
        metrics |= {"predicted_dice_mae": float(np.abs(predicted - true).mean()), "aurc": curve["aurc"],
                    "aurc_optimal": curve["optimal_aurc"], "failures": float(failed.sum()),
                    "failure_auroc": float(roc_auc_score(failed, -predicted)) if 0 < failed.sum() < len(failed)
                    else math.nan}
        if all("needs_review" in r for r in scored):
            flagged = np.array([bool(r["needs_review"]) for r in scored])
            metrics["missed_failure_rate"] = float((failed & ~flagged).mean())
    with_p = [r for r in rows if math.isfinite(r.get("ood_p", math.nan))]
    if with_p:
        metrics["ood_fraction"] = float(np.mean([str(r.get("review_reasons", "")).startswith("input unlike")
                                                 for r in with_p]))
    return metrics


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


def trust_metrics(rows: list[dict[str, Any]], structures: dict[int, str], cdr_classes: int,
                  failure_dice: float = 0.8) -> dict[str, float]:
    """Everything above as one dict (keys as in the functions; ``cdr_ece`` from :func:`cdr_reliability`)."""
    names = list(structures.values())
    metrics = uncertainty_and_review(rows, structures) | volume_interval_coverage(rows, names) | quality_and_flag(
        rows, names, failure_dice) if structures else {}
    metrics |= mmse_interval_coverage(rows) | cdr_set_coverage(rows, cdr_classes)
    bins = cdr_reliability(rows, cdr_classes)
    if bins is not None:
        metrics["cdr_ece"] = bins_calibration_error(bins)
    return metrics
