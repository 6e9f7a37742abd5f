"""Clinical encoder: standardised numeric features, embedded categories and a missingness mask."""

from __future__ import annotations

import torch
from torch import nn

from jointray.data.clinical import ClinicalInput


class ClinicalEncoder(nn.Module):
    """Embed a clinical record as one vector and as a set of tokens (one per feature, plus a null token).

    Each numeric feature j becomes the token ``value_j · w_j + b_j + m_j · missing_j`` (a learned
    "missing" embedding replaces information that is absent); each categorical feature an embedding
    whose index 0 means missing. The null token is always present so that attention over tokens is
    defined even when every feature of a subject is missing.

    numeric (B, Fn), missing (B, Fn), categorical (B, Fc) → vector (B, D), tokens (B, Fn + Fc + 1, D)
    """

    def __init__(self, num_numeric: int, cardinalities: list[int], dim: int, dropout: float):
        super().__init__()
        self.value_weight = nn.Parameter(torch.randn(num_numeric, dim) * 0.1)
        self.value_bias = nn.Parameter(torch.zeros(num_numeric, dim))
        self.missing_embedding = nn.Parameter(torch.zeros(num_numeric, dim))
        self.embeddings = nn.ModuleList(nn.Embedding(k, dim) for k in cardinalities)
        self.null_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim, dim))

    def all_missing(self, batch: int, device: torch.device | str) -> ClinicalInput:
        """A record with every feature missing: what the model sees when no clinical input is given."""
        num, cat = self.value_weight.shape[0], len(self.embeddings)
        return ClinicalInput(torch.zeros(batch, num, device=device), torch.ones(batch, num, dtype=torch.bool, device=device),
                             torch.zeros(batch, cat, dtype=torch.long, device=device))

    def forward(self, clinical: ClinicalInput) -> tuple[torch.Tensor, torch.Tensor]:
        numeric = clinical.numeric.unsqueeze(-1) * self.value_weight + self.value_bias
        numeric = numeric + clinical.missing.unsqueeze(-1).to(numeric.dtype) * self.missing_embedding
        tokens = [numeric] + [emb(clinical.categorical[:, j]).unsqueeze(1) for j, emb in enumerate(self.embeddings)]
        tokens.append(self.null_token.expand(numeric.shape[0], -1, -1))
        tokens = torch.cat(tokens, dim=1)
        return self.mlp(tokens.mean(dim=1)), tokens
