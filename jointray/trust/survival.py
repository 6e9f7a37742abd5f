"""An absolute risk: the probability of the event by a horizon, from the Cox head's relative score.

The risk head gives a log hazard ratio η (a ranking, not a probability). On held-back cases with follow-up
(time, event), a Cox model with η as its one covariate (lifelines' ``CoxPHFitter``, Breslow's baseline
hazard) gives a recalibration slope β and the baseline survival S₀(τ) at the horizon τ, so that::

    P(event by τ | η) = 1 − S₀(τ)^{exp(β (η − η̄))}

(η̄: the calibration cases' mean, where lifelines centres its baseline). Breslow N.E., "Discussion of the
paper by D.R. Cox", JRSS B 1972; Cox D.R., JRSS B 1972. Its calibration at τ is checked by comparing, within
risk groups, the mean predicted probability with the Kaplan–Meier estimate of 1 − S(τ) (:func:`check_at_horizon`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from lifelines import CoxPHFitter, KaplanMeierFitter


@dataclass
class AbsoluteRisk:
    """``horizon`` (the time unit of the training targets), ``slope`` β, ``centre`` η̄ and ``baseline_survival``
    S₀(τ); ``cases`` and ``events`` it was fitted on."""

    horizon: float
    slope: float
    centre: float
    baseline_survival: float
    cases: int
    events: int

    @classmethod
    def fit(cls, risk, time, event, horizon: float | None = None) -> AbsoluteRisk:
        """From calibration cases' predicted log hazards and follow-up; ``horizon`` defaults to the median
        follow-up time of the cases with an event."""
        frame = pd.DataFrame({"risk": np.asarray(risk, np.float64), "time": np.asarray(time, np.float64),
                              "event": np.asarray(event, np.float64)}).dropna()
        if frame["event"].sum() < 2:
            raise ValueError(f"an absolute risk needs at least 2 events, got {int(frame['event'].sum())}")
        tau = float(np.median(frame.loc[frame["event"] > 0, "time"])) if horizon is None else float(horizon)
        model = CoxPHFitter(baseline_estimation_method="breslow").fit(frame, "time", "event")
        baseline = model.baseline_survival_
        at = baseline.index.values <= tau
        survival = float(baseline.values[at][-1, 0]) if at.any() else 1.0
        return cls(horizon=tau, slope=float(model.params_["risk"]), centre=float(frame["risk"].mean()),
                   baseline_survival=survival, cases=len(frame), events=int(frame["event"].sum()))

    def probability(self, risk) -> np.ndarray:
        """P(event by the horizon) for log hazards ``risk``."""
        risk = np.asarray(risk, np.float64)
        return 1.0 - self.baseline_survival ** np.exp(self.slope * (risk - self.centre))


def check_at_horizon(probability, time, event, horizon: float, groups: int = 3) -> list[dict[str, float]]:
    """Per group of predicted probability (``groups`` quantile groups): its mean prediction and the
    Kaplan–Meier estimate of the event probability by ``horizon`` (NaN where follow-up ends before it)."""
    probability, time, event = (np.asarray(a, np.float64) for a in (probability, time, event))
    keep = np.isfinite(probability) & np.isfinite(time) & np.isfinite(event)
    probability, time, event = probability[keep], time[keep], event[keep]
    edges = np.quantile(probability, np.linspace(0, 1, groups + 1))
    which = np.clip(np.searchsorted(edges, probability, side="right") - 1, 0, groups - 1)
    out = []
    for g in range(groups):
        members = which == g
        if not members.any():
            continue
        fitter = KaplanMeierFitter().fit(time[members], event[members])
        observed = 1.0 - float(fitter.predict(horizon)) if time[members].max() >= horizon else math.nan
        out.append({"cases": float(members.sum()), "predicted": float(probability[members].mean()),
                    "observed": observed})
    return out
