"""Per-structure binary masks from integer label maps, and voxel spacing for a batch.

Shared by :mod:`jointray.metrics.segmentation` and :mod:`jointray.metrics.volume`, so that overlap,
distance and volume metrics read the same structures in the same millimetres.

Shapes: label map (B, X, Y, Z) integer; masks (B, S, X, Y, Z) for S structures; spacing (B, 3) in mm,
one entry per array axis X, Y, Z (the voxel size along that axis, not a world-axis size).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

#: Structures to score: label → name (e.g. ``{1: "anterior", 2: "posterior"}``), or plain labels.
Structures = Mapping[int, str] | Sequence[int]

#: Voxel size in mm: one (3,) spacing for the whole batch, or (B, 3), one per sample.
Spacing = Sequence[float] | Sequence[Sequence[float]] | np.ndarray | Tensor


def structure_names(structures: Structures) -> dict[int, str]:
    """Label → name, in the given order; plain labels are named by their number (``"1"``, ``"2"``)."""
    if isinstance(structures, Mapping):
        names = {int(label): str(name) for label, name in structures.items()}
    else:
        names = {int(label): str(int(label)) for label in structures}
    if not names:
        raise ValueError("at least one structure label is needed")
    if len(set(names.values())) != len(names):
        raise ValueError(f"structure names must be unique, got {names}")
    return names


def structure_masks(label_map: Tensor, labels: Sequence[int]) -> Tensor:
    """Binary masks, one channel per label: (B, X, Y, Z) integer → (B, S, X, Y, Z) float32 in {0, 1}.

    Channel ``s`` is ``label_map == labels[s]``; this is the one-hot layout MONAI's metrics expect,
    restricted to the structures of interest (so background is never a channel).
    """
    label_map = torch.as_tensor(label_map)
    if label_map.ndim != 4:
        raise ValueError(f"label map must be (B, X, Y, Z), got shape {tuple(label_map.shape)}")
    if label_map.is_floating_point():
        raise ValueError(f"label map must hold integer labels, got dtype {label_map.dtype}")
    wanted = torch.as_tensor(list(labels), dtype=label_map.dtype, device=label_map.device)
    return (label_map[:, None] == wanted.view(1, -1, 1, 1, 1)).to(torch.float32)


def batch_spacing(spacing: Spacing, batch_size: int) -> Tensor:
    """Spacing as a (B, 3) float64 tensor in mm: a (3,) spacing is repeated for every sample."""
    mm = torch.as_tensor(spacing, dtype=torch.float64).cpu()
    if mm.shape == (3,):
        mm = mm.expand(batch_size, 3)
    if mm.shape != (batch_size, 3):
        raise ValueError(f"spacing must be (3,) or ({batch_size}, 3), got shape {tuple(mm.shape)}")
    if not bool(torch.all(mm > 0)):
        raise ValueError(f"spacing must be positive, got {mm.tolist()}")
    return mm
