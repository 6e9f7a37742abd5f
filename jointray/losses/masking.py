"""Helpers shared by the outcome losses: shape checks, missing-value masks and a graph-connected zero."""

from __future__ import annotations

import torch


def as_vector(x: torch.Tensor, name: str) -> torch.Tensor:
    """Return a (B,) view of a per-subject tensor given as (B,) or (B, 1).

    Heads often end in ``nn.Linear(..., 1)``; accepting (B, 1) here avoids a silent (B, B) broadcast
    against a (B,) target, which is the usual way a per-subject loss goes wrong.
    """
    if x.dim() == 2 and x.shape[1] == 1:
        return x[:, 0]
    if x.dim() != 1:
        raise ValueError(f"{name} must have shape (B,) or (B, 1), got {tuple(x.shape)}")
    return x


def present(x: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the entries that are observed: finite floats (NaN marks a missing value)."""
    if torch.is_floating_point(x):
        return torch.isfinite(x)
    return torch.ones_like(x, dtype=torch.bool)


def zero_with_graph(*tensors: torch.Tensor) -> torch.Tensor:
    """A scalar 0 that depends on ``tensors``, so that ``backward()`` works and gives zero gradients.

    Built from empty slices rather than ``0 * x.sum()``: a NaN anywhere in ``x`` (e.g. an unused output
    of a subject without a target) would otherwise turn the zero into NaN.
    """
    total = tensors[0].reshape(-1)[:0].sum()
    for t in tensors[1:]:
        total = total + t.reshape(-1)[:0].sum()
    return total
