"""The preprocessing specification: every parameter of :mod:`jointray.data.preprocess`, versioned and hashed.

Written beside the shards as ``spec.json`` and carried by every checkpoint, so that serving applies
exactly what training saw. It is also the ``preprocess`` section of :class:`jointray.config.Config`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _SpecSection(BaseModel):
    # As every config section: a misspelt key fails instead of falling back to a default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class IntensityConfig(_SpecSection):
    """Intensity normalisation, per image and channel."""

    mode: Literal["zscore", "percentile"] = "zscore"
    foreground_only: bool = Field(
        True, description="zscore: statistics over voxels above the image minimum only"
    )
    percentiles: tuple[float, float] = (0.5, 99.5)

    @field_validator("percentiles")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 <= v[0] < v[1] <= 100.0:
            raise ValueError("need 0 <= low < high <= 100")
        return v


class PreprocessSpec(_SpecSection):
    """Every parameter of preprocessing, versioned and hashed.

    Written beside the shards as ``spec.json`` and carried by checkpoints, so that serving applies
    exactly what training saw. Bump ``version`` whenever the meaning of a parameter changes.
    """

    version: int = 1
    orientation: Literal["RAS"] = "RAS"
    target_spacing: tuple[float, float, float] | None = Field(
        (1.0, 1.0, 1.0), description="mm; null keeps each case's own spacing"
    )
    target_shape: tuple[int, int, int] = (48, 64, 48)
    crop_center: Literal["label", "image"] = Field(
        "label",
        description="where a crop window is centred on an axis longer than target_shape: the label's "
        "bounding box when the case has a label, else the image centre",
    )
    intensity: IntensityConfig = IntensityConfig()
    pad_value: float = 0.0
    channels: int = Field(1, ge=1, description="image modalities/views per case")

    @field_validator("target_shape")
    @classmethod
    def _positive_shape(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if min(v) < 1:
            raise ValueError("every dimension must be >= 1")
        return v

    @field_validator("target_spacing")
    @classmethod
    def _positive_spacing(cls, v: tuple[float, float, float] | None) -> tuple[float, float, float] | None:
        if v is not None and min(v) <= 0:
            raise ValueError("every spacing must be > 0")
        return v

    def digest(self) -> str:
        """A stable hash of every parameter (hex, 16 chars)."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]
