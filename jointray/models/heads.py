"""Outcome heads (MMSE, CDR, Cox risk) and the segmentation → outcome interaction."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

#: MMSE is bounded; predicting through a scaled sigmoid keeps every sample (MC included) in range.
MMSE_MAX = 30.0
#: Initial MMSE prediction: near the cohort-typical score, so early training is not spent on the offset.
MMSE_INIT = 26.0


class StructurePooling(nn.Module):
    """Features pooled inside each predicted structure, plus the predicted structure volumes.

    For every foreground class k: ``f_k = Σ p_k·F / (Σ p_k + ε)`` over voxels (soft masked average of
    the decoder features F under the predicted probability p_k, both at the features' resolution), and
    ``log1p(Σ p_k · voxel_mm³ / 1000)`` (volume in ml, from full-resolution probabilities). Soft
    probabilities keep it differentiable, so the outcome loss also shapes the mask.

    logits (B, K, X, Y, Z), features (B, C, X/s, Y/s, Z/s), voxel_volume (B,) mm³ → (B, (K-1)·(C+1))
    """

    def forward(self, logits: torch.Tensor, features: torch.Tensor, voxel_volume: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits.float(), dim=1)[:, 1:]  # (B, K-1, X, Y, Z)
        mass = probs.flatten(2).sum(-1)  # (B, K-1)
        coarse = F.adaptive_avg_pool3d(probs, features.shape[2:]).flatten(2)
        pooled = torch.einsum("bkn,bcn->bkc", coarse, features.float().flatten(2)) / (
            coarse.sum(-1, keepdim=True) + 1e-6)
        volume_ml = torch.log1p(mass * voxel_volume.unsqueeze(-1) / 1000.0)
        return torch.cat([pooled, volume_ml.unsqueeze(-1)], dim=-1).flatten(1)


class OutcomeHeads(nn.Module):
    """Task heads on a shared outcome representation h (B, D), each with its own dropout (MC samples).

    - ``mmse``: (B,) in [0, 30].
    - ``cdr``: (B, K-1) CORAL logits (Cao et al. 2020): one shared weight vector and K-1 ordered biases,
      which makes the cumulative probabilities rank-consistent.
    - ``risk``: (B,) Cox log-risk, no bias (the partial likelihood ignores it).
    """

    def __init__(self, dim: int, heads: list[str], cdr_classes: int, dropout: float):
        super().__init__()
        self.names = list(heads)
        self.trunk = nn.ModuleDict({
            name: nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, dim), nn.GELU(), nn.Dropout(dropout))
            for name in heads
        })
        self.out = nn.ModuleDict()
        if "mmse" in heads:
            self.out["mmse"] = nn.Linear(dim, 1)
            nn.init.constant_(self.out["mmse"].bias, math.log(MMSE_INIT / (MMSE_MAX - MMSE_INIT)))
        if "cdr" in heads:
            self.out["cdr"] = nn.Linear(dim, 1, bias=False)
            self.cdr_bias = nn.Parameter(torch.linspace(1.0, -1.0, cdr_classes - 1))
        if "risk" in heads:
            self.out["risk"] = nn.Linear(dim, 1, bias=False)

    def forward(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        """Outputs in fp32 under any autocast: in bf16 an MMSE near 26 could only take steps of 1/8 point."""
        result = {}
        for name in self.names:
            features = self.trunk[name](h)
            with torch.autocast(h.device.type, enabled=False):
                z = self.out[name](features.to(self.out[name].weight.dtype))  # the weights' own fp32 (or fp64)
            if name == "mmse":
                result[name] = MMSE_MAX * torch.sigmoid(z.squeeze(-1))
            elif name == "cdr":
                result[name] = z + self.cdr_bias
            else:
                result[name] = z.squeeze(-1)
        return result
