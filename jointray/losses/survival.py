"""Cox proportional-hazards loss: the negative log partial likelihood, with Efron or Breslow ties."""

from __future__ import annotations

import torch
from torch.nn.modules.loss import _Loss

from jointray.losses.masking import as_vector, present, zero_with_graph


class CoxPHLoss(_Loss):
    """Negative log partial likelihood of risk scores (Cox, "Regression models and life-tables",
    JRSS B 1972), with tied event times handled by Efron's or Breslow's approximation.

    For distinct event times t_j with event set D_j (d_j events) and risk set R_j = {i : T_i ≥ t_j}, and
    risk scores η (log relative hazards)::

        Breslow (Breslow 1974):  ℓ = Σ_j [ Σ_{D_j} η_i − d_j · log Σ_{R_j} e^{η_i} ]
        Efron   (Efron 1977):    ℓ = Σ_j [ Σ_{D_j} η_i − Σ_{l=0}^{d_j−1} log(Σ_{R_j} e^{η_i} − l/d_j·Σ_{D_j} e^{η_i}) ]

    Efron is the default (as in R's ``survival`` and lifelines); the two coincide without ties.
    The loss is ``−ℓ / (number of events)``: the partial likelihood has one term per event, so this is
    a per-event mean whose scale depends neither on the batch size nor on the censoring rate, and the
    optimum is that of ``−ℓ``. In mini-batch training the risk sets are those within the batch, the
    usual stochastic approximation (e.g. DeepSurv, Katzman et al., BMC Med. Res. Methodol. 2018).

    Computed without a loop over subjects: sort by time (descending, so each risk set is a prefix),
    group tied times with ``unique_consecutive``, take risk-set sums as ``logcumsumexp`` at the end of
    each tie group, and tie-group sums with ``index_add``. All sums are formed in log space, so large or
    widely spread scores neither overflow nor underflow; float64 inputs are computed in float64.

    Subjects whose time or event is NaN are left out. When no event remains, the loss is a 0 connected
    to the graph.

    Shapes:
        - input: (B,) or (B, 1) risk scores η (higher = earlier event).
        - time: (B,) float follow-up times, NaN = missing.
        - event: (B,) 1 = event observed, 0 = censored, NaN = missing (float, int or bool).
        - output: scalar.
    """

    def __init__(self, ties: str = "efron") -> None:
        """
        Args:
            ties: ``"efron"`` or ``"breslow"``.
        """
        super().__init__()
        if ties not in ("efron", "breslow"):
            raise ValueError(f"ties must be 'efron' or 'breslow', got {ties!r}")
        self.ties = ties

    def forward(self, input: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
        risk = as_vector(input, "input")
        time = as_vector(time, "time")
        event = as_vector(event, "event")
        if not risk.shape == time.shape == event.shape:
            raise ValueError(f"input, time and event differ in batch size: {risk.shape}, {time.shape}, {event.shape}")
        keep = present(time) & present(event)
        risk, time, event = risk[keep], time[keep], event[keep]
        if not bool(((event == 0) | (event == 1)).all()):
            raise ValueError(f"event must be 0 or 1 (NaN = missing), got {event.unique().tolist()}")
        observed = event == 1
        n_events = int(observed.sum())
        if n_events == 0:
            return zero_with_graph(input)

        order = torch.argsort(time, descending=True)
        eta, time, observed = risk[order], time[order], observed[order]
        _, group, counts = torch.unique_consecutive(time, return_inverse=True, return_counts=True)
        n_groups = counts.numel()
        # log Σ_{R_j} e^η: the cumulative sum up to the last subject of each tie group (ties share a risk set).
        log_risk_set = torch.logcumsumexp(eta, dim=0)[counts.cumsum(0) - 1]  # (G,)

        event_index = observed.nonzero().squeeze(1)
        event_group = group[event_index]
        term = log_risk_set[event_group]  # Breslow: the same denominator for every tied event
        if self.ties == "efron":
            events_per_group = torch.zeros(n_groups, dtype=eta.dtype, device=eta.device)
            events_per_group.index_add_(0, group, observed.to(eta.dtype))
            # log Σ_{D_j} e^η, shifted by the largest tied-event score; the shift is detached because
            # the result does not depend on it.
            event_eta = eta[event_index]
            shift = torch.full((n_groups,), -torch.inf, dtype=eta.dtype, device=eta.device)
            shift = shift.scatter_reduce(0, event_group, event_eta.detach(), reduce="amax")
            shift = torch.where(torch.isfinite(shift), shift, 0.0)
            tied = torch.zeros(n_groups, dtype=eta.dtype, device=eta.device)
            tied = tied.index_add(0, event_group, torch.exp(event_eta - shift[event_group]))
            has_events = events_per_group > 0
            log_tied = shift + torch.log(torch.where(has_events, tied, 1.0))
            share = torch.exp(log_tied - log_risk_set)  # Σ_D e^η / Σ_R e^η, in (0, 1]
            # l = 0..d_j-1: the rank of each event within its tie group (their order does not matter).
            events_before_group = events_per_group.cumsum(0) - events_per_group
            rank = torch.arange(n_events, device=eta.device, dtype=eta.dtype) - events_before_group[event_group]
            # log(R − (l/d)·D) = log R + log(1 − (l/d)·D/R); D/R ≤ 1 and l/d < 1 keep the argument positive.
            term = term + torch.log1p(-(rank / events_per_group[event_group]) * share[event_group])
        log_likelihood = (eta[event_index] - term).sum()
        return -log_likelihood / n_events
