"""Outcome heads (MMSE, CDR, Cox risk) and the predicted structure volumes they read."""

from __future__ import annotations

import math

import torch
from torch import nn

#: MMSE is bounded; predicting through a scaled sigmoid keeps every sample (MC included) in range.
MMSE_MAX = 30.0
#: Initial MMSE prediction: near the cohort-typical score, so early training is not spent on the offset.
MMSE_INIT = 26.0


class StructureVolumes(nn.Module):
    """The predicted volume of each foreground structure, ``log1p(n_k · voxel_mm³ / 1000)`` (ml), where n_k
    counts the voxels whose argmax class is k: the volume of the mask the model outputs.

    Not differentiable, and on purpose: the outcome losses cannot move the mask. A mask grown or shrunk
    to fit a cognitive score is wrong anatomy, and the volume a clinician reads off it would be wrong
    too; the labels alone decide where the structure is. Nor a soft volume Σ p_k: the small
    probabilities spread over the whole background would add up to several times the structure's own
    volume, and vary from case to case with the model's calibration rather than the anatomy.

    Volumes only, not features pooled inside each structure: at a few hundred subjects every extra input
    per case is one more way for the heads to tell training subjects apart, and the volume is the
    established hippocampal biomarker.

    logits (B, K, X, Y, Z), voxel_volume (B,) mm³ → (B, K-1)
    """

    def forward(self, logits: torch.Tensor, voxel_volume: torch.Tensor) -> torch.Tensor:
        labels = logits.detach().argmax(dim=1).flatten(1)  # (B, N)
        classes = torch.arange(1, logits.shape[1], device=logits.device)
        counts = (labels.unsqueeze(1) == classes.view(1, -1, 1)).sum(-1).float()  # (B, K-1)
        return torch.log1p(counts * voxel_volume.float().unsqueeze(-1) / 1000.0)


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
