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

================================  =====  =====  ===========  ===========  ======
case                              Dice   IoU    HD95         ASSD         missed
================================  =====  =====  ===========  ===========  ======
both empty                        1      1      NaN          NaN          0
prediction empty (a miss)         0      0      diagonal     diagonal     1
reference empty (spurious)        0      0      diagonal     diagonal     0
================================  =====  =====  ===========  ===========  ======

Dice and IoU follow MONAI with ``ignore_empty=False``. A distance to an empty surface does not
exist (MONAI returns NaN or inf); leaving it out of a mean would reward a model for missing the
hard cases, so one empty mask scores the worst case instead, as Metrics Reloaded recommends: the
**diagonal** of the image box in mm, ``√Σ_i (n_i·s_i)²`` for n_i voxels of s_i mm along axis i,
longer than any distance between two voxel centres of that grid. It is the grid the masks are on:
the training window in validation, the input's own grid in ``evaluate``. ``missed/<name>`` flags the
misses so that summaries can count them beside the distances they inflate. Both empty is a correct
answer with no surface to measure: Dice 1 (MONAI), distances NaN, left out of the distance means
by :func:`jointray.metrics.aggregate.summarize` and :func:`jointray.metrics.cohort.validation_metrics`,
and not a miss.

Reference: Maier-Hein L. et al., "Metrics reloaded: recommendations for image analysis validation",
Nat Methods 21 (2024) 195–212, for the definitions, their pitfalls and the worst-case convention.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

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


def image_diagonal(shape: Sequence[int], spacing: Tensor) -> Tensor:
    """Length in mm of the image box's diagonal, the worst-case surface distance.

    Args:
        shape: the grid, (X, Y, Z) voxels.
        spacing: (B, 3) voxel sizes in mm, as from :func:`jointray.metrics.structures.batch_spacing`.

    Returns:
        (B,) float64: ``√Σ_i (n_i·s_i)²``.
    """
    extent = torch.as_tensor(list(shape), dtype=torch.float64) * spacing
    return extent.square().sum(dim=1).sqrt()


#: The surface-distance metrics :func:`segmentation_metrics` can compute, each with its own distance transforms.
DISTANCES = ("hd95", "assd")


def segmentation_metrics(pred: Tensor, target: Tensor, structures: Structures, spacing: Spacing,
                         distances: Sequence[str] = DISTANCES) -> dict[str, Tensor]:
    """Dice, IoU, HD95 (mm) and ASSD (mm) per sample and structure, and which structures were missed.

    Args:
        pred: predicted label map, (B, X, Y, Z) integer.
        target: reference label map, (B, X, Y, Z) integer.
        structures: labels to score, ``{1: "anterior", 2: "posterior"}`` or ``[1, 2]``.
        spacing: voxel size in mm along X, Y, Z, (3,) for the batch or (B, 3) per sample.
        distances: the surface distances to compute, of :data:`DISTANCES`. Each costs MONAI's distance
            transforms of every case and structure, far more than the overlaps: a caller that reports
            only HD95 (validation every epoch, ``evaluate``) asks for ``("hd95",)``.

    Returns:
        ``{"dice/<name>", "iou/<name>", "hd95/<name>", "assd/<name>", "missed/<name>"}`` → (B,)
        float32 tensors on the input's device (the distances asked for only); one column per key makes a
        per-case table (one row per sample). ``missed`` is 1 where the prediction is empty and the
        reference is not, else 0; empty masks give the values of the module docstring's table.
    """
    unknown = set(distances) - set(DISTANCES)
    if unknown:
        raise ValueError(f"unknown distances {sorted(unknown)}; choose from {DISTANCES}")
    names = structure_names(structures)
    pred_masks = structure_masks(pred, list(names))
    target_masks = structure_masks(target, list(names))
    if pred_masks.shape != target_masks.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape")
    mm = batch_spacing(spacing, pred_masks.shape[0])
    # MONAI insists on Python floats of one type, per sample.
    spacing_mm = [tuple(row) for row in mm.tolist()]

    dice = compute_dice(pred_masks, target_masks, include_background=True, ignore_empty=False)
    iou = compute_iou(pred_masks, target_masks, include_background=True, ignore_empty=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_EMPTY_MASK_WARNING, category=UserWarning)
        warnings.filterwarnings("ignore", message=_MONAI_INTERNAL_DEPRECATION, category=FutureWarning)
        measured = {}
        if "hd95" in distances:
            measured["hd95"] = compute_hausdorff_distance(
                pred_masks, target_masks, include_background=True, percentile=95, spacing=spacing_mm
            )
        if "assd" in distances:
            measured["assd"] = compute_average_surface_distance(
                pred_masks, target_masks, include_background=True, symmetric=True, spacing=spacing_mm
            )
    spatial = (2, 3, 4)
    pred_empty = (pred_masks.sum(spatial) == 0).cpu()  # (B, S)
    target_empty = (target_masks.sum(spatial) == 0).cpu()
    worst = image_diagonal(pred_masks.shape[2:], mm)[:, None].expand_as(pred_empty)  # (B, S)
    nan = torch.full_like(worst, float("nan"))

    def documented(distance: Tensor) -> Tensor:
        """MONAI's distances with the empty cases replaced by the module docstring's values."""
        distance = distance.cpu().to(torch.float64)
        distance = torch.where(pred_empty ^ target_empty, worst, distance)
        return torch.where(pred_empty & target_empty, nan, distance)

    values = {"dice": dice, "iou": iou} | {name: documented(d) for name, d in measured.items()}
    values["missed"] = (pred_empty & ~target_empty).float()
    return {
        f"{metric}/{name}": per_structure[:, s].to(device=pred_masks.device, dtype=torch.float32)
        for metric, per_structure in values.items()
        for s, name in enumerate(names.values())
    }
