"""The tensors that pass between the model, the losses and the metrics of the joint tasks.

Here rather than in ``models/`` or ``losses/`` so that neither package imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class JointOutput:
    """``seg``: logits [(B, K, X, Y, Z), (B, K, X/2, ...), (B, K, X/4, ...)] or None;
    ``outcomes``: name → (B,) or (B, K-1) for ``cdr``; ``hidden``: the outcome representation (B, D)."""

    seg: list[torch.Tensor] | None
    outcomes: dict[str, torch.Tensor] = field(default_factory=dict)
    hidden: torch.Tensor | None = None


@dataclass
class Targets:
    """label (B, X, Y, Z) long; has_label (B,) bool; mmse, cdr (stage), time, event (B,) float, NaN = missing."""

    label: torch.Tensor | None = None
    has_label: torch.Tensor | None = None
    mmse: torch.Tensor | None = None
    cdr: torch.Tensor | None = None
    time: torch.Tensor | None = None
    event: torch.Tensor | None = None
