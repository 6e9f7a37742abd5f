"""Clinical features: a schema fitted on training subjects, and the tensors the model reads.

Numeric columns are standardised with the training mean and standard deviation; a missing value
becomes 0 (the mean) with its flag set in ``missing``, so the model can tell "average" from
"unknown" (missingness is informative in clinical data). Categorical columns map to indices
``1..K``; 0 means missing or a category never seen in training. The schema travels with the
checkpoint so inference encodes a record exactly as training did.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from pydantic import BaseModel

from jointray.data.shards import CLINICAL_PREFIX


@dataclass
class ClinicalInput:
    """numeric (B, Fn) float32, missing (B, Fn) bool, categorical (B, Fc) int64."""

    numeric: torch.Tensor
    missing: torch.Tensor
    categorical: torch.Tensor

    def to(self, device: torch.device | str) -> ClinicalInput:
        return ClinicalInput(self.numeric.to(device), self.missing.to(device), self.categorical.to(device))

    def repeat(self, times: int) -> ClinicalInput:
        """Tile along the batch axis: (B, F) → (times·B, F), sample-major like ``Tensor.repeat``."""
        return ClinicalInput(self.numeric.repeat(times, 1), self.missing.repeat(times, 1),
                             self.categorical.repeat(times, 1))


class NumericFeature(BaseModel):
    name: str
    mean: float
    std: float


class CategoricalFeature(BaseModel):
    name: str
    categories: list[str]


class ClinicalSchema(BaseModel):
    numeric: list[NumericFeature] = []
    categorical: list[CategoricalFeature] = []

    @property
    def num_numeric(self) -> int:
        return len(self.numeric)

    @property
    def cardinalities(self) -> list[int]:
        """Embedding sizes per categorical feature (categories + the 'missing' index 0)."""
        return [len(c.categories) + 1 for c in self.categorical]

    @classmethod
    def fit(cls, columns: dict[str, np.ndarray]) -> ClinicalSchema:
        """Fit on training rows: ``columns`` maps shard column names (``clin_*``) to value arrays."""
        numeric, categorical = [], []
        for key in sorted(k for k in columns if k.startswith(CLINICAL_PREFIX)):
            name, values = key.removeprefix(CLINICAL_PREFIX), columns[key]
            if np.issubdtype(np.asarray(values).dtype, np.number):
                present = np.asarray(values, np.float64)
                present = present[np.isfinite(present)]
                mean = float(present.mean()) if present.size else 0.0
                std = float(present.std()) if present.size > 1 else 1.0
                numeric.append(NumericFeature(name=name, mean=mean, std=std if std > 0 else 1.0))
            else:
                seen = sorted({str(v) for v in values if v is not None})
                categorical.append(CategoricalFeature(name=name, categories=seen))
        return cls(numeric=numeric, categorical=categorical)

    def encode(self, columns: dict[str, np.ndarray], batch_size: int) -> ClinicalInput:
        """Shard columns of one batch → model tensors (see the module docstring)."""
        numeric = np.zeros((batch_size, self.num_numeric), np.float32)
        missing = np.ones((batch_size, self.num_numeric), bool)
        for j, feature in enumerate(self.numeric):
            values = np.asarray(columns.get(CLINICAL_PREFIX + feature.name, np.full(batch_size, np.nan)), np.float64)
            present = np.isfinite(values)
            numeric[present, j] = (values[present] - feature.mean) / feature.std
            missing[:, j] = ~present
        categorical = np.zeros((batch_size, len(self.categorical)), np.int64)
        for j, feature in enumerate(self.categorical):
            index = {c: i + 1 for i, c in enumerate(feature.categories)}
            values = columns.get(CLINICAL_PREFIX + feature.name, [None] * batch_size)
            categorical[:, j] = [index.get(str(v), 0) if v is not None else 0 for v in values]
        return ClinicalInput(torch.from_numpy(numeric), torch.from_numpy(missing), torch.from_numpy(categorical))
