"""Per-structure overlap and surface-distance metrics for label maps: Dice, IoU, HD95, ASSD.

All four come from MONAI (``compute_dice``, ``compute_iou``, ``compute_hausdorff_distance``,
``compute_average_surface_distance``), called on one binary channel per structure, with the voxel
spacing so that distances are in mm on anisotropic grids. As MONAI defines them:

* surfaces are the boundary voxels of each mask (the mask minus its erosion), distances are
  Euclidean between voxel centres, scaled per axis by the spacing;
* **HD95** is the larger of the two *directed* 95th percentiles (pred → target and target → pred,
  linear interpolation), not the 95th percentile of the pooled distances as in e.g. MedPy;
* **ASSD** (average symmetric surface distance) is the mean over the pooled distances of both
  directions, so the surface with more boundary voxels weighs more.

Empty masks (a structure absent from the prediction, the reference, or both):

==========================  =====  =====  ===========  ===========
case                        Dice   IoU    HD95         ASSD
==========================  =====  =====  ===========  ===========
both empty                  1      1      NaN          NaN
exactly one empty           0      0      NaN          NaN
==========================  =====  =====  ===========  ===========

Dice and IoU follow MONAI with ``ignore_empty=False``. A distance to an empty surface does not
exist: MONAI returns NaN for both-empty, and for one-empty NaN (HD95, from interpolating infinite
distances) or inf (ASSD); here every undefined distance is NaN, so a NaN-skipping mean
(:func:`jointray.metrics.aggregate.summarize`) leaves those cases out of the distance summaries
while their Dice of 0 still counts the miss.

Reference: Maier-Hein L. et al., "Metrics reloaded", Nat Methods 21 (2024) 195–212, for the
definitions and their pitfalls.
"""

from __future__ import annotations

import warnings

import torch
from monai.metrics import (
    compute_average_surface_distance,
    compute_dice,
    compute_hausdorff_distance,
    compute_iou,
)
from torch import Tensor

from jointray.metrics.structures import Spacing, Structures, batch_spacing, structure_masks, structure_names

#: MONAI warns once per empty mask; the empty cases are handled (and documented) here instead.
_EMPTY_MASK_WARNING = r"the (ground truth|prediction) of class .* is all 0"
#: MONAI 1.6 passes its own deprecated ``always_return_as_numpy`` argument internally: nothing to act on.
_MONAI_INTERNAL_DEPRECATION = r".*get_mask_edges:always_return_as_numpy"


def segmentation_metrics(pred: Tensor, target: Tensor, structures: Structures, spacing: Spacing) -> dict[str, Tensor]:
    """Dice, IoU, HD95 (mm) and ASSD (mm) per sample and structure.

    Args:
        pred: predicted label map, (B, X, Y, Z) integer.
        target: reference label map, (B, X, Y, Z) integer.
        structures: labels to score, ``{1: "anterior", 2: "posterior"}`` or ``[1, 2]``.
        spacing: voxel size in mm along X, Y, Z, (3,) for the batch or (B, 3) per sample.

    Returns:
        ``{"dice/<name>", "iou/<name>", "hd95/<name>", "assd/<name>"}`` → (B,) float32 tensors on
        the input's device; one column per key makes a per-case table (one row per sample).
    """
    names = structure_names(structures)
    pred_masks = structure_masks(pred, list(names))
    target_masks = structure_masks(target, list(names))
    if pred_masks.shape != target_masks.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape")
    # MONAI insists on Python floats of one type, per sample.
    spacing_mm = [tuple(row) for row in batch_spacing(spacing, pred_masks.shape[0]).tolist()]

    dice = compute_dice(pred_masks, target_masks, include_background=True, ignore_empty=False)
    iou = compute_iou(pred_masks, target_masks, include_background=True, ignore_empty=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_EMPTY_MASK_WARNING, category=UserWarning)
        warnings.filterwarnings("ignore", message=_MONAI_INTERNAL_DEPRECATION, category=FutureWarning)
        hd95 = compute_hausdorff_distance(
            pred_masks, target_masks, include_background=True, percentile=95, spacing=spacing_mm
        )
        assd = compute_average_surface_distance(
            pred_masks, target_masks, include_background=True, symmetric=True, spacing=spacing_mm
        )
    spatial = (2, 3, 4)
    undefined = (pred_masks.sum(spatial) == 0) | (target_masks.sum(spatial) == 0)  # (B, S)
    values = {
        "dice": dice,
        "iou": iou,
        "hd95": hd95.masked_fill(undefined.to(hd95.device), float("nan")),
        "assd": assd.masked_fill(undefined.to(assd.device), float("nan")),
    }
    return {
        f"{metric}/{name}": per_structure[:, s].to(device=pred_masks.device, dtype=torch.float32)
        for metric, per_structure in values.items()
        for s, name in enumerate(names.values())
    }
