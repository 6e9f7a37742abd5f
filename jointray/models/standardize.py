"""Standardisation of features by running statistics, never by the batch's own."""

from __future__ import annotations

import torch
from torch import nn


class RunningStandardize(nn.Module):
    """``(x − μ) / sqrt(σ² + ε)`` per feature, with μ and σ² running estimates held as buffers.

    Every call standardises with the estimates as they stand (μ = 0, σ² = 1 before the first training
    batch). In training it then folds the batch into them: their plain average over the first
    ``1/momentum`` batches, then an exponential moving average with rate ``momentum``. Unlike BatchNorm's
    training mode, a subject's output never depends on the other subjects of its batch: with 4 cases a
    batch, BatchNorm would turn each predicted hippocampal volume into a volume relative to three others.
    Training and evaluation standardise the same way, and the estimates follow inputs that drift as the
    network learns (predicted structure volumes change as the segmentation improves). Under DDP each rank
    updates its own estimates; the trainer broadcasts rank 0's buffers after every epoch, as for
    BatchNorm.

    The rate is BatchNorm's 0.1: the first batches' inputs can be wild (the volumes of an untrained
    segmentation, many times the structure's), and an average that remembered them for hundreds of batches
    would keep the variance far above the inputs' own long after they settle.

    x (B, F) → (B, F), in the buffers' dtype.
    """

    def __init__(self, features: int, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        if not 0 < momentum <= 1:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        self.momentum, self.eps = momentum, eps
        self.register_buffer("mean", torch.zeros(features))
        self.register_buffer("var", torch.ones(features))
        self.register_buffer("batches", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.mean.dtype)  # float32 (the model's own dtype when it is cast, e.g. to float64)
        out = (x - self.mean) / torch.sqrt(self.var + self.eps)  # new tensors: the update below cannot alter it
        if self.training:
            with torch.no_grad():
                self.batches += 1
                rate = max(self.momentum, 1.0 / float(self.batches))
                self.mean.lerp_(x.mean(0), rate)
                self.var.lerp_((x - self.mean).pow(2).mean(0), rate)
        return out
