"""Huber loss for a continuous score (MMSE) whose target may be missing."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.modules.loss import _Loss

from jointray.losses.masking import as_vector, present, zero_with_graph


class MaskedHuberLoss(_Loss):
    """Huber loss over the subjects whose target is present; NaN marks a missing target.

    ``loss = mean_{i: y_i present} huber_δ(ŷ_i − y_i)`` with ``huber_δ(r) = r²/2`` for ``|r| ≤ δ`` and
    ``δ(|r| − δ/2)`` beyond (Huber, "Robust estimation of a location parameter", Ann. Math. Stat. 1964).
    Quadratic near the target, linear in the tails, so a few implausible scores (data-entry errors,
    floor/ceiling effects of MMSE) do not dominate the gradient. The mean runs over present subjects
    only, so the scale does not depend on how many targets a batch happens to miss; when none is
    present the loss is a 0 connected to the graph.

    Shapes:
        - input: (B,) or (B, 1) predictions.
        - target: (B,) float, NaN = missing.
        - output: scalar.
    """

    def __init__(self, delta: float = 1.0) -> None:
        """
        Args:
            delta: where the loss turns from quadratic to linear, in target units (MMSE points when the
                head predicts on the 0–30 scale).
        """
        super().__init__()
        if delta <= 0:
            raise ValueError(f"delta must be positive, got {delta}")
        self.delta = float(delta)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        input = as_vector(input, "input")
        target = as_vector(target, "target")
        if input.shape != target.shape:
            raise ValueError(f"input {tuple(input.shape)} and target {tuple(target.shape)} differ in batch size")
        mask = present(target)
        if not bool(mask.any()):
            return zero_with_graph(input)
        return F.huber_loss(input[mask], target[mask].to(input.dtype), reduction="mean", delta=self.delta)
