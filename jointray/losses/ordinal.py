"""The ordinal loss for the clinical dementia rating (CDR): CORAL, with its class probabilities and prediction.

CDR stages are mapped to ordinal classes by :func:`cdr_to_class`: 0 → 0, 0.5 → 1, 1 → 2, 2 → 3, 3 → 4,
and every stage above the top class is merged into it. With the default ``num_classes=4``
(``model.cdr_classes``) stage 3 (severe dementia) is merged with stage 2: it is rare in the cohorts
this targets and, once a subject is at stage 2, the distinction matters less than the earlier ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.nn.modules.loss import _Loss

from jointray.losses.masking import as_vector, zero_with_graph

#: CDR stages in order; the index is the class before merging the top stages.
CDR_STAGES = (0.0, 0.5, 1.0, 2.0, 3.0)


def cdr_to_class(cdr: torch.Tensor, num_classes: int = 4) -> torch.Tensor:
    """Map CDR stages to ordinal classes; NaN (missing) → -1.

    Args:
        cdr: (B,) float CDR stages in {0, 0.5, 1, 2, 3} or NaN.
        num_classes: K; stages at or above the K-th are merged into class K-1.

    Returns:
        (B,) long classes in ``[0, K)``, -1 where missing.

    Raises:
        ValueError: a value that is neither NaN nor a CDR stage.
    """
    cdr = torch.as_tensor(cdr, dtype=torch.float64)
    stages = torch.tensor(CDR_STAGES, dtype=torch.float64, device=cdr.device)
    missing = torch.isnan(cdr)
    matches = cdr.unsqueeze(-1) == stages
    valid = matches.any(-1) | missing
    if not bool(valid.all()):
        raise ValueError(f"CDR values must be one of {CDR_STAGES} or NaN, got {cdr[~valid].tolist()}")
    classes = matches.long().argmax(-1).clamp(max=num_classes - 1)
    return torch.where(missing, -1, classes)


def class_to_cdr(classes: torch.Tensor) -> torch.Tensor:
    """Map ordinal classes back to CDR stages (a merged top class gives its lowest stage); -1 → NaN.

    Args:
        classes: (B,) integer classes, -1 = missing.

    Returns:
        (B,) float64 CDR stages, NaN where missing.
    """
    classes = torch.as_tensor(classes).long()
    if bool(((classes < -1) | (classes >= len(CDR_STAGES))).any()):
        raise ValueError(f"classes must be in [-1, {len(CDR_STAGES)}), got {classes.tolist()}")
    stages = torch.tensor(CDR_STAGES, dtype=torch.float64, device=classes.device)
    return torch.where(classes < 0, torch.nan, stages[classes.clamp(min=0)])


def _class_targets(target: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) targets with -1 or NaN for missing → (mask of present subjects, long classes of those)."""
    target = as_vector(target, "target")
    if torch.is_floating_point(target):
        mask = torch.isfinite(target) & (target >= 0)
    else:
        mask = target >= 0
    classes = target[mask]
    if bool(((classes >= num_classes) | (classes != classes.round())).any()):
        raise ValueError(f"class targets must be integers in [0, {num_classes}) or -1/NaN, got {classes.tolist()}")
    return mask, classes.long()


class CoralLoss(_Loss):
    """CORAL loss: K-1 binary tasks "class > k" with shared logits (Cao, Mirjalili, Raschka,
    "Rank consistent ordinal regression for neural networks", Pattern Recognition Letters 2020).

    ``loss = mean_i −Σ_k λ_k [1(y_i > k) log σ(z_ik) + 1(y_i ≤ k) log(1 − σ(z_ik))]`` over subjects with a
    target (the paper's eq. 4, averaged over the batch). Rank consistency (``σ(z_i0) ≥ σ(z_i1) ≥ …``) comes
    from the head, not from the loss: the logits must be ``z_ik = g(x_i) + b_k``, one shared score and K-1
    biases, as in :class:`jointray.models.heads.OutcomeHeads`.

    Shapes:
        - input: (B, K-1) logits, ``σ(z_k) = P(y > k)``.
        - target: (B,) integer classes in ``[0, K)``; -1 or NaN = missing.
        - output: scalar; a 0 connected to the graph when no target is present.
    """

    def __init__(self, importance_weights: Sequence[float] | None = None) -> None:
        """
        Args:
            importance_weights: λ_k, one per threshold (K-1); default all 1 (the paper's default).
        """
        super().__init__()
        weights = None if importance_weights is None else torch.as_tensor(importance_weights, dtype=torch.float64)
        self.register_buffer("importance_weights", weights, persistent=False)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if input.dim() != 2:
            raise ValueError(f"input must be (B, K-1) logits, got {tuple(input.shape)}")
        num_classes = input.shape[1] + 1
        mask, classes = _class_targets(target, num_classes)
        if not bool(mask.any()):
            return zero_with_graph(input)
        logits = input[mask]
        thresholds = torch.arange(num_classes - 1, device=input.device)
        levels = (classes.unsqueeze(1) > thresholds).to(logits.dtype)  # (N, K-1): 1(y > k)
        per_task = F.binary_cross_entropy_with_logits(logits, levels, reduction="none")
        if self.importance_weights is not None:
            per_task = per_task * self.importance_weights.to(logits.dtype)
        return per_task.sum(dim=1).mean()


def coral_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities from CORAL logits: ``p_k = P(y > k-1) − P(y > k)``.

    ``P(y > k) = σ(z_k)``, made non-increasing in k by a running minimum so that every probability is
    non-negative even for a head that is not rank-consistent (for a CORAL head it changes nothing).

    Args:
        logits: (B, K-1).

    Returns:
        (B, K), non-negative, summing to 1 over the classes.
    """
    exceed = torch.cummin(torch.sigmoid(logits), dim=1).values  # P(y > k), k = 0..K-2
    ones = torch.ones_like(exceed[:, :1])
    cumulative = torch.cat([ones, exceed, torch.zeros_like(ones)], dim=1)  # P(y > k), k = -1..K-1
    return cumulative[:, :-1] - cumulative[:, 1:]


def coral_predict(logits: torch.Tensor) -> torch.Tensor:
    """Predicted class from CORAL logits: the number of thresholds with ``P(y > k) > 0.5`` (Cao et al. eq. 5).

    Args:
        logits: (B, K-1).

    Returns:
        (B,) long classes in ``[0, K)``.
    """
    return (logits > 0).sum(dim=1)
