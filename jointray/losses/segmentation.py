"""Multi-scale (deeply supervised) Dice + cross-entropy for the segmentation decoder."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch.nn.modules.loss import _Loss

from jointray.losses.masking import zero_with_graph

_ADAPTIVE_AVG_POOL = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}


def pool_label(label: torch.Tensor, size: Sequence[int], num_classes: int) -> torch.Tensor:
    """Downsample an integer label map so that no foreground structure disappears.

    Each coarse voxel covers a block of fine voxels (``adaptive_avg_pool`` windows, i.e. exact
    ``f×f×f`` blocks when the size divides). It gets the foreground class that fills most of its block
    if any foreground voxel is in the block, and background only when the whole block is background:
    max-pooling of the one-hot foreground channels, with the per-class voxel count breaking the tie
    between two foreground classes (then the lower class index).

    Why not nearest-neighbour (``F.interpolate(mode="nearest-exact")``, as in MONAI's
    ``DeepSupervisionLoss``): it keeps one voxel out of every ``f³`` block, so at 1/4 resolution a thin
    structure such as the hippocampal tail (2–3 voxels across) is broken up or dropped entirely, and the
    coarse heads would be trained to miss it. Pooling keeps every structure present at full resolution,
    at the price of slightly dilating it at the coarse scales, which only the auxiliary heads see.

    Args:
        label: (B, *spatial) integer classes in ``[0, num_classes)``.
        size: the coarse spatial size, e.g. ``logits.shape[2:]``.
        num_classes: K, background (class 0) included.

    Returns:
        (B, *size) long tensor.
    """
    spatial = label.dim() - 1
    if tuple(label.shape[1:]) == tuple(size):
        return label.long()
    one_hot = F.one_hot(label.long(), num_classes).movedim(-1, 1).float()  # (B, K, *spatial)
    fraction = _ADAPTIVE_AVG_POOL[spatial](one_hot, tuple(size))[:, 1:]  # foreground share of each block
    has_foreground = fraction.amax(dim=1) > 0
    return torch.where(has_foreground, fraction.argmax(dim=1) + 1, 0)


class DeepSupervisionDiceCE(_Loss):
    """Weighted Dice + cross-entropy over the full-resolution and the coarse decoder outputs.

    ``loss = Σ_s w_s · DiceCE(logits_s, pool_label(label, size_s))`` with the weights normalised to sum
    to 1 over the outputs actually given, so the loss keeps the scale of a single DiceCE whether or not
    the coarse heads are used (Lee et al., "Deeply-supervised nets", AISTATS 2015; multi-scale weights
    as in nnU-Net, Isensee et al., Nature Methods 2021).

    Each term is MONAI's :class:`monai.losses.DiceCELoss` with softmax and a one-hot target. The Dice
    part excludes the background by default (``include_background=False``): the hippocampus fills well
    under 1 % of the volume, so a background Dice near 1 would dilute the foreground signal; the
    cross-entropy part always covers all classes, background included, which keeps the background
    calibrated. Coarse labels come from :func:`pool_label` (foreground-preserving pooling, see there).

    Subjects without a label (``has_label`` False) are dropped before the loss, so they contribute
    nothing (not even to the mean); when no subject has a label the loss is a 0 connected to the graph.

    Shapes:
        - logits: a (B, K, X, Y, Z) tensor, or a sequence of them at full, 1/2, 1/4… resolution.
        - label: (B, X, Y, Z) integer, full resolution.
        - has_label: (B,) bool, optional (default: every subject has a label).
        - output: scalar.
    """

    def __init__(
        self,
        weights: Sequence[float] = (0.6, 0.3, 0.1),
        include_background: bool = False,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
    ) -> None:
        """
        Args:
            weights: one weight per output, full resolution first; normalised over the outputs given.
            include_background: whether the Dice part includes class 0 (cross-entropy always does).
            lambda_dice: weight of the Dice part.
            lambda_ce: weight of the cross-entropy part.
            smooth_nr: Dice numerator smoothing (MONAI).
            smooth_dr: Dice denominator smoothing (MONAI).
            batch: sum Dice intersections and unions over the batch before dividing (MONAI).
        """
        super().__init__()
        if not weights or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"weights must be non-negative with a positive sum, got {tuple(weights)}")
        self.weights = tuple(float(w) for w in weights)
        self.dice_ce = DiceCELoss(
            include_background=include_background,
            to_onehot_y=True,
            softmax=True,
            lambda_dice=lambda_dice,
            lambda_ce=lambda_ce,
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
            batch=batch,
        )

    def forward(
        self,
        logits: torch.Tensor | Sequence[torch.Tensor],
        label: torch.Tensor,
        has_label: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            logits: (B, K, *spatial) or a sequence of them, full resolution first.
            label: (B, *spatial) integer classes at full resolution.
            has_label: (B,) bool; subjects marked False contribute nothing.
        """
        outputs = [logits] if isinstance(logits, torch.Tensor) else list(logits)
        if len(outputs) > len(self.weights):
            raise ValueError(f"got {len(outputs)} outputs but only {len(self.weights)} weights")
        if label.dim() != outputs[0].dim() - 1 or label.shape[0] != outputs[0].shape[0]:
            raise ValueError(
                f"label must be (B, *spatial) for logits {tuple(outputs[0].shape)}, got {tuple(label.shape)}"
            )
        weights = self.weights[: len(outputs)]
        total_weight = sum(weights)
        if total_weight <= 0:
            raise ValueError(f"the weights of the {len(outputs)} outputs given sum to 0: {weights}")
        if has_label is not None:
            if not bool(has_label.any()):
                return zero_with_graph(*outputs)
            outputs = [o[has_label] for o in outputs]
            label = label[has_label]
        num_classes = outputs[0].shape[1]
        loss = zero_with_graph(*outputs)
        for weight, output in zip(weights, outputs, strict=True):
            if weight == 0:
                continue
            # Half-precision softmax and voxel-wise log-sums lose too much precision; float64 is kept.
            output = output if output.dtype == torch.float64 else output.float()
            target = pool_label(label, output.shape[2:], num_classes).unsqueeze(1)
            loss = loss + (weight / total_weight) * self.dice_ce(output, target)
        return loss
