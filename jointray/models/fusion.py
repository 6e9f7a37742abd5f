"""Cross-modal fusion of image features with the clinical record: FiLM and cross-attention."""

from __future__ import annotations

import torch
from torch import nn


class FiLM(nn.Module):
    """Feature-wise linear modulation (Perez et al. 2018, "FiLM: visual reasoning with a general
    conditioning layer"): ``x · (1 + γ(c)) + β(c)``, per channel.

    γ and β start at zero, so an untrained FiLM is the identity and clinical conditioning is learned
    only as far as it helps.

    x (B, C, X, Y, Z), c (B, D) → (B, C, X, Y, Z)
    """

    def __init__(self, channels: int, cond_dim: int):
        super().__init__()
        self.project = nn.Linear(cond_dim, 2 * channels)
        nn.init.zeros_(self.project.weight)
        nn.init.zeros_(self.project.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.project(cond).chunk(2, dim=-1)
        shape = (*gamma.shape, *([1] * (x.ndim - 2)))
        return x * (1 + gamma.view(shape)) + beta.view(shape)


class ClinicalCrossAttention(nn.Module):
    """Image tokens (bottleneck voxels) attend to clinical tokens; residual, pre-norm.

    x (B, C, X, Y, Z), tokens (B, T, D) → (B, C, X, Y, Z)
    """

    def __init__(self, channels: int, token_dim: int, heads: int = 4):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.attention = nn.MultiheadAttention(channels, heads, kdim=token_dim, vdim=token_dim, batch_first=True)
        # Zero-initialised output: the block starts as the identity, like FiLM.
        nn.init.zeros_(self.attention.out_proj.weight)
        nn.init.zeros_(self.attention.out_proj.bias)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        queries = x.flatten(2).transpose(1, 2)  # (B, N, C)
        update, _ = self.attention(self.norm(queries), tokens, tokens, need_weights=False)
        return x + update.transpose(1, 2).reshape(x.shape)
