"""Harrell's concordance index for risk scores, defined exactly as ``lifelines.utils.concordance_index``.

A pair of subjects (i, j) is *comparable* when i had the event and is known to have had it first:

* t_i < t_j and event_i (j either had its event later or was censored later), or
* t_i = t_j, event_i and not event_j (an event and a censoring at the same time: the censored
  subject is taken to have survived longer).

Two events at the same time are not comparable, nor is any pair whose earlier time is censored.
A comparable pair is concordant when risk_i > risk_j and counts 0.5 when the risks are tied::

    C = (concordant + 0.5·tied) / comparable

This is lifelines' ``concordance_index(time, -risk, event)``: lifelines scores predicted
*survival times* (longer = lower risk), hence the sign. Harrell F.E., Lee K.L., Mark D.B.,
Stat Med 15 (1996) 361–387.

Every pair is formed at once as an (n, n) matrix: O(n²) time and memory, a few boolean n × n
temporaries (about 25 MB each for n = 5000), which is fine up to a few thousand subjects.
"""

from __future__ import annotations

import torch
from torch import Tensor


def concordance_index(risk: Tensor, time: Tensor, event: Tensor) -> float:
    """Harrell's C for risk scores (higher = earlier event).

    Args:
        risk: (n,) predicted risk, e.g. a Cox log hazard ratio.
        time: (n,) time to event or censoring.
        event: (n,) 1 (or any non-zero) if the event was observed, 0 if censored.

    Returns:
        C in [0, 1]; NaN when no pair is comparable (e.g. all censored). Subjects with a NaN in
        any input are left out.
    """
    risk = torch.as_tensor(risk, dtype=torch.float64).reshape(-1)
    time = torch.as_tensor(time, dtype=torch.float64, device=risk.device).reshape(-1)
    event = torch.as_tensor(event, dtype=torch.float64, device=risk.device).reshape(-1)
    if not risk.shape == time.shape == event.shape:
        raise ValueError(
            f"risk, time and event must have the same length, got {risk.shape}, {time.shape}, {event.shape}"
        )
    complete = ~(torch.isnan(risk) | torch.isnan(time) | torch.isnan(event))
    risk, time, observed = risk[complete], time[complete], event[complete] != 0

    # Row i, column j: is (i, j) comparable with i first? Each unordered pair is counted once,
    # since the conditions cannot hold both ways round.
    first = (time[:, None] < time[None, :]) | ((time[:, None] == time[None, :]) & ~observed[None, :])
    comparable = observed[:, None] & first
    pairs = int(comparable.sum())
    if pairs == 0:
        return float("nan")
    concordant = int((comparable & (risk[:, None] > risk[None, :])).sum())
    tied = int((comparable & (risk[:, None] == risk[None, :])).sum())
    # Python float arithmetic on exact integer counts, as lifelines does with numpy int64.
    return (concordant + tied / 2) / pairs
