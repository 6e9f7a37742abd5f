"""A model's calibration: everything :mod:`jointray.trust` fits on held-back cases, as one JSON-able object.

:class:`Calibration` is fitted by ``jointray calibrate`` (:mod:`jointray.inference.calibrate`) from the
per-case rows that the inference core writes for labelled cases that neither trained the model nor
chose its checkpoint, stored in the calibrated model's ``ensemble.json`` (:mod:`jointray.artifacts`),
and applied by :class:`~jointray.inference.predictor.Predictor`, so ``evaluate``, ``predict`` and the
server agree. It holds:

* ``scaling``: the voxel probability scaling (:mod:`jointray.trust.scaling`) and whether the mask is
  the calibrated argmax (``mask_calibrated``: only when that did not lower Dice on the calibration cases);
* ``volume`` per structure, ``mmse``: split-conformal intervals (:mod:`jointray.trust.conformal`),
  normalised by the Monte Carlo SD under the calibration's ``settings``; ``cdr``: ordinal sets; ``risk``:
  the probability of the event by a horizon (:mod:`jointray.trust.survival`);
* ``quality``: predicted Dice (:mod:`jointray.trust.quality`) and ``review_threshold``, the flag's
  threshold from conformal risk control (:mod:`jointray.trust.risk_control`);
* ``ood``: the out-of-distribution test (:mod:`jointray.trust.ood`).

:data:`COVERAGE_SENTENCE`, :data:`REVIEW_SENTENCE` and :data:`OOD_SENTENCE` say what each promises, in
the words every answer and report shows.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from jointray.losses.ordinal import cdr_to_class
from jointray.trust import ood as ood_module
from jointray.trust import quality as quality_module
from jointray.trust.conformal import ConformalInterval, OrdinalSet
from jointray.trust.ood import OutlierTest
from jointray.trust.quality import QualityModel
from jointray.trust.risk_control import risk_control_threshold
from jointray.trust.scaling import ProbabilityScaling
from jointray.trust.survival import AbsoluteRisk

COVERAGE_SENTENCE = ("Each {level:.0%} interval holds the true value for at least {level:.0%} of cases like the "
                     "{cases} calibration cases (split-conformal, marginal over cases); it does not promise "
                     "{level:.0%} for any one patient, nor for inputs unlike the calibration cases.")
REVIEW_SENTENCE = ("A case is flagged when its predicted worst-structure Dice is below {threshold:.3f}: for cases "
                   "like the {cases} calibration cases, the chance that a case fails (a structure's Dice below "
                   "{failure_dice:g}) and is not flagged is at most {alpha:.0%} (conformal risk control); it does "
                   "not bound the share of failures among unflagged cases.")
OOD_SENTENCE = ("Flagged as unlike the calibration cases when its conformal p-value is at most {alpha:.3g}: an "
                "input like them is flagged this way with probability at most {alpha:.3g}.")


class InferenceSettings(BaseModel):
    """The inference settings a calibration was fitted under; its σ-normalised intervals need the same."""

    model_config = ConfigDict(extra="forbid")
    mirror: bool
    mc_samples: int
    mc_mode: str


class Calibration(BaseModel):
    """See the module docstring."""

    # An infinite threshold (flag everything) or interval survives JSON as the string "Infinity".
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="strings")
    level: float = Field(0.9, gt=0, lt=1)
    settings: InferenceSettings
    cases: int
    data: str = ""
    scaling: ProbabilityScaling | None = None
    scaling_method: str = "none"
    mask_calibrated: bool = False
    volume: dict[str, ConformalInterval] = Field(default_factory=dict)
    mmse: ConformalInterval | None = None
    cdr: OrdinalSet | None = None
    risk: AbsoluteRisk | None = None
    quality: QualityModel | None = None
    failure_dice: float = 0.8
    review_alpha: float = 0.05
    review_threshold: float = math.inf
    ood: OutlierTest | None = None
    ood_alpha: float = 0.02
    fit_metrics: dict[str, float] = Field(default_factory=dict)

    def settings_match(self, mirror: bool, mc_samples: int, mc_mode: str) -> bool:
        """Whether a prediction ran as the calibration did (σ-normalised intervals need it)."""
        return (self.settings.mirror, self.settings.mc_samples, self.settings.mc_mode) == (mirror, mc_samples, mc_mode)

    def coverage_sentence(self, level: float | None = None) -> str:
        return COVERAGE_SENTENCE.format(level=level or self.level, cases=self.cases)

    def review_sentence(self) -> str:
        return REVIEW_SENTENCE.format(threshold=self.review_threshold, cases=self.cases,
                                      failure_dice=self.failure_dice, alpha=self.review_alpha)

    def ood_sentence(self) -> str:
        return OOD_SENTENCE.format(alpha=self.ood_alpha)


def _column(rows: list[dict[str, Any]], key: str) -> np.ndarray:
    return np.array([rows_value(r, key) for r in rows], np.float64)


def rows_value(row: dict[str, Any], key: str) -> float:
    value = row.get(key)
    return math.nan if value is None else float(value)


def fit_calibration(rows: list[dict[str, Any]], structures: list[str], settings: InferenceSettings,
                    level: float = 0.9, scaling: ProbabilityScaling | None = None, scaling_method: str = "none",
                    mask_calibrated: bool = False, failure_dice: float = 0.8, review_alpha: float = 0.05,
                    ood_alpha: float = 0.02, cdr_stages: list[str] | None = None, data: str = "",
                    fit_metrics: dict[str, float] | None = None, risk_horizon: float | None = None) -> Calibration:
    """A :class:`Calibration` from the per-case rows of held-back cases predicted with ``scaling`` applied.

    Args:
        rows: per-case rows (:meth:`~jointray.inference.predictor.CasePrediction.row`): ``volume/``,
            ``volume_ref/``, ``volume_sd/`` and ``dice/`` per structure, the quality and OOD features,
            ``pred_mmse``, ``pred_mmse_sd``, ``mmse``, ``prob_cdr/<stage>``, ``cdr`` where present.
        structures: the structure names.
        settings: how the rows were predicted.
        level: the intervals' default coverage.
        scaling, scaling_method, mask_calibrated: the voxel calibration already applied to the rows.
        failure_dice, review_alpha: a failure is a case with a structure's Dice below ``failure_dice``; the
            review flag bounds the probability of an unflagged failure by ``review_alpha``.
        ood_alpha: the out-of-distribution test's false-flag bound.
        cdr_stages: the CDR stages (``prob_cdr/<stage>`` keys, in order) of a model with a CDR head.
        risk_horizon: the horizon of the absolute risk (default: the median time to event of the cases).
    """
    # A conformal test on n cases has p-values no smaller than 1/(n + 1), and risk control pays 1/(n + 1) up
    # front: below that a flag could never fire (OOD) or would fire on every case (review).
    for name, alpha in (("ood_alpha", ood_alpha), ("review_alpha", review_alpha)):
        if alpha < 1 / (len(rows) + 1):
            raise ValueError(f"{name}={alpha:g} needs at least {math.ceil(1 / alpha) - 1} calibration cases "
                             f"(got {len(rows)}): the smallest conformal p-value of {len(rows)} cases is "
                             f"1/{len(rows) + 1}; use more cases or a {name} of at least {1 / (len(rows) + 1):.3f}")
    calibration = Calibration(level=level, settings=settings, cases=len(rows), data=data, scaling=scaling,
                              scaling_method=scaling_method, mask_calibrated=mask_calibrated,
                              failure_dice=failure_dice, review_alpha=review_alpha, ood_alpha=ood_alpha,
                              fit_metrics=dict(fit_metrics or {}))
    sampled = settings.mc_samples > 1
    for name in structures:
        truth = _column(rows, f"volume_ref/{name}")
        if np.isfinite(truth).any():
            calibration.volume[name] = ConformalInterval.fit(
                truth, _column(rows, f"volume/{name}"), _column(rows, f"volume_sd/{name}") if sampled else None)
    if any(math.isfinite(rows_value(r, "mmse")) and "pred_mmse" in r for r in rows):
        calibration.mmse = ConformalInterval.fit(_column(rows, "mmse"), _column(rows, "pred_mmse"),
                                                 _column(rows, "pred_mmse_sd") if sampled else None)
    if cdr_stages and any(math.isfinite(rows_value(r, "cdr")) for r in rows):
        probabilities = np.array([[rows_value(r, f"prob_cdr/{s}") for s in cdr_stages] for r in rows])
        # The head's classes: stages above its last class are merged into it (CDR 3 is class "2" of four).
        truth = cdr_to_class(torch.tensor(_column(rows, "cdr")), len(cdr_stages)).numpy()
        calibration.cdr = OrdinalSet.fit(probabilities, truth)
    followed = [r for r in rows if "pred_risk" in r and math.isfinite(rows_value(r, "time"))]
    if sum(rows_value(r, "event") > 0 for r in followed) >= 2:
        calibration.risk = AbsoluteRisk.fit(*(_column(followed, k) for k in ("pred_risk", "time", "event")),
                                            horizon=risk_horizon)
    labelled = [r for r in rows if all(f"dice/{s}" in r for s in structures)]
    if structures and len(labelled) >= 5:
        features = np.stack([quality_module.features_of(r, structures) for r in labelled])  # (n, S, F)
        dice = np.array([[rows_value(r, f"dice/{s}") for s in structures] for r in labelled])
        calibration.quality = QualityModel.fit(features.reshape(-1, features.shape[-1]), dice.reshape(-1))
        worst = quality_module.out_of_fold(features, dice).min(axis=1)
        calibration.review_threshold = risk_control_threshold(worst, dice.min(axis=1) < failure_dice, review_alpha)
    ood_rows = np.array([[rows_value(r, ood_module.feature_key(f)) for f in ood_module.FEATURES] for r in rows])
    if len(rows) >= 5 and np.isfinite(ood_rows).any():  # rows of a model without segmentation have none
        calibration.ood = OutlierTest.fit(ood_rows)
    return calibration
