"""Shard batches (NumPy columns from Ray Data) → model inputs and targets on a device."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from jointray.data.clinical import ClinicalInput, ClinicalSchema
from jointray.models.layout import image_in_layout
from jointray.tasks import Targets


@dataclass
class ModelBatch:
    """One batch on the model's device, with each case's prepared-grid geometry.

    ``spacing`` (B, 3) float64 on the CPU, mm per array axis X, Y, Z: the column norms of each case's
    affine (the voxel size along that axis, whatever the orientation); validation measures surface
    distances with it, so they are in mm whether or not ``preprocess.target_spacing`` resampled.
    ``voxel_volume`` (B,) float32 on the device, mm³: |det| of the affine (right for sheared grids too).
    """

    image: torch.Tensor  # (B, C, X, Y, Z)
    clinical: ClinicalInput
    targets: Targets
    voxel_volume: torch.Tensor  # (B,) mm³ of the prepared grid
    spacing: torch.Tensor  # (B, 3) mm per array axis of the prepared grid
    subject_ids: list[str]

    @property
    def size(self) -> int:
        return self.image.shape[0]


def to_model_batch(batch: dict[str, np.ndarray], schema: ClinicalSchema, device: torch.device | str,
                   channels_last: bool = False) -> ModelBatch:
    """Convert one ``iter_batches(batch_format="numpy")`` batch; clinical strings are encoded here,
    since ``iter_torch_batches`` cannot carry string columns. ``channels_last``: the image in the
    layout of a model converted by :func:`jointray.models.layout.to_layout`."""
    size = len(batch["subject_id"])

    def floats(name: str) -> torch.Tensor:
        return torch.as_tensor(np.asarray(batch[name], np.float32), device=device)

    affine = np.asarray(batch["affine"], np.float64).reshape(size, 4, 4)
    voxel_volume = np.abs(np.linalg.det(affine[:, :3, :3]))
    spacing = np.linalg.norm(affine[:, :3, :3], axis=1)  # (B, 3): norm of each column, one per array axis
    return ModelBatch(
        image=image_in_layout(torch.as_tensor(np.asarray(batch["image"], np.float32), device=device), channels_last),
        clinical=schema.encode(batch, size).to(device),
        targets=Targets(
            label=torch.as_tensor(np.asarray(batch["label"], np.int64), device=device),
            has_label=torch.as_tensor(np.asarray(batch["has_label"], bool), device=device),
            mmse=floats("mmse"), cdr=floats("cdr"), time=floats("time"), event=floats("event"),
        ),
        voxel_volume=torch.as_tensor(voxel_volume, dtype=torch.float32, device=device),
        spacing=torch.as_tensor(spacing, dtype=torch.float64),
        subject_ids=[str(s) for s in batch["subject_id"]],
    )
