"""Post-processing of a predicted mask: keep only the largest connected component of a structure, where
cross-validation shows that it helps.

nnU-Net (Isensee et al., Nature Methods 2021, "post-processing") removes every connected component of a
structure but the largest when doing so raises that structure's mean Dice over the out-of-fold
predictions of the cross-validation, and not otherwise: a structure that can be split in two (or a
second, contralateral instance) would lose its smaller part. :class:`ComponentEvidence` collects the
per-case Dice with and without it and :meth:`~ComponentEvidence.decide` applies the rule;
:func:`keep_largest_component` applies the decision at inference, on the mask in the input's own space:
as MONAI's ``KeepLargestConnectedComponent`` (full connectivity, removed voxels become background), with
scipy's labelling rather than scikit-image's, which that transform needs on a CPU.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage


def keep_largest_component(mask: np.ndarray, labels: list[int]) -> np.ndarray:
    """``mask`` (X, Y, Z) integer labels with, for each of ``labels``, only its largest connected component
    (26-connectivity in 3D); other labels are left as they are."""
    if not labels:
        return mask
    kept = mask.copy()
    full = np.ones((3,) * mask.ndim, dtype=bool)
    for k in labels:
        components, count = ndimage.label(mask == k, structure=full)
        if count > 1:
            largest = 1 + int(np.argmax(np.bincount(components.ravel())[1:]))
            kept[(components > 0) & (components != largest)] = 0
    return kept


def _dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice of two boolean masks; NaN when both are empty (the case says nothing about this structure)."""
    total = int(pred.sum()) + int(target.sum())
    return math.nan if total == 0 else 2.0 * int(np.logical_and(pred, target).sum()) / total


class ComponentEvidence:
    """Per-structure Dice of out-of-fold predictions, as predicted and with only the largest component kept.

    Args:
        structures: label → name of the foreground structures.
    """

    def __init__(self, structures: dict[int, str]):
        self.structures = structures
        self.dice: dict[str, list[tuple[float, float]]] = {name: [] for name in structures.values()}

    def add(self, mask: np.ndarray, label: np.ndarray) -> None:
        """One case: the predicted ``mask`` (before post-processing) and its reference ``label``, same grid."""
        largest = keep_largest_component(mask, list(self.structures))
        for k, name in self.structures.items():
            target = label == k
            self.dice[name].append((_dice(mask == k, target), _dice(largest == k, target)))

    def figures(self) -> dict[str, dict[str, float]]:
        """Per structure: cases scored, mean Dice as predicted and with the largest component only."""
        result = {}
        for name, pairs in self.dice.items():
            # Keeping the largest component never empties a structure, so both Dice are NaN or neither is.
            scored = np.array([pair for pair in pairs if not math.isnan(pair[0])]).reshape(-1, 2)
            plain, largest = scored.mean(0) if len(scored) else (math.nan, math.nan)
            result[name] = {"cases": len(scored), "dice": float(plain), "dice_largest_component": float(largest)}
        return result

    def decide(self) -> list[str]:
        """The structures whose mean Dice rises when only their largest component is kept (nnU-Net's rule)."""
        return [name for name, f in self.figures().items() if f["cases"] and f["dice_largest_component"] > f["dice"]]
