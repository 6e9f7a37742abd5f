"""Post-hoc calibration of class probabilities: per-class temperature scaling or vector scaling.

The model's (ensembled, mirrored) probabilities ``p`` are rescaled on the log scale::

    q = softmax(a ⊙ log p + b)          a, b ∈ R^K

``a`` alone (``b = 0``) is per-class temperature scaling (``a_k = 1/T_k``); with ``b`` it is vector
scaling (Guo et al., "On calibration of modern neural networks", ICML 2017, §4.2). Working on
``log p`` rather than logits lets one scaling serve an ensemble and test-time mirroring, whose
members' probabilities are averaged first. ``a`` and ``b`` minimise the negative log-likelihood of the
reference labels on voxels of held-back cases (L-BFGS). One shared ``a`` with ``b = 0`` (``a_k = a``)
is classic temperature scaling and never changes the argmax; per-class ``a`` or a bias can, which is
why :mod:`jointray.trust.calibration` checks Dice before it lets the calibrated argmax be the mask.

The scaling is fitted on, and applied to, the voxels near the predicted structures only
(:func:`near_structures`, chosen by the prediction alone, so the same at fitting and inference): how sure
a model should be differs between a structure's border and the far background (Ding et al., "Local
temperature scaling for probability calibration", ICCV 2021, fit a temperature per voxel). Two regions
are the simplest version of that: one scaling where the errors are, and the far background, which every
sensible model calls correctly with near certainty, left as it is (one global temperature softened it
and raised the all-voxel ECE on MSD: benchmarks/README.md, "Trust").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

#: Floor of a probability before its logarithm (float32 soft-max output can be exactly 0).
_FLOOR = 1e-7
#: Voxels within this many 6-connected steps of a predicted structure are "near" it.
MARGIN = 3


def near_structures(probabilities: np.ndarray) -> np.ndarray:
    """(X, Y, Z) bool: the voxels within :data:`MARGIN` steps of a voxel whose argmax is a structure, for
    (K, X, Y, Z) probabilities."""
    return ndimage.binary_dilation(probabilities.argmax(0) > 0, iterations=MARGIN)


@dataclass(frozen=True)
class ProbabilityScaling:
    """``scale`` (K,) and ``bias`` (K,) of ``softmax(scale ⊙ log p + bias)``; the identity is ones and zeros."""

    scale: tuple[float, ...]
    bias: tuple[float, ...]

    @classmethod
    def identity(cls, classes: int) -> ProbabilityScaling:
        return cls(scale=(1.0,) * classes, bias=(0.0,) * classes)

    def apply(self, probabilities: np.ndarray, axis: int = 0) -> np.ndarray:
        """Calibrated probabilities of the same shape and dtype: classes along ``axis`` (K, ...)."""
        shape = [1] * probabilities.ndim
        shape[axis] = len(self.scale)
        scale = np.asarray(self.scale, np.float64).reshape(shape)
        bias = np.asarray(self.bias, np.float64).reshape(shape)
        logits = scale * np.log(np.maximum(probabilities, _FLOOR)) + bias
        logits -= logits.max(axis=axis, keepdims=True)
        exp = np.exp(logits)
        return (exp / exp.sum(axis=axis, keepdims=True)).astype(probabilities.dtype)

    def apply_near(self, probabilities: np.ndarray) -> np.ndarray:
        """(K, X, Y, Z) probabilities calibrated near the predicted structures (:func:`near_structures`), the
        rest as they were."""
        near = near_structures(probabilities)
        calibrated = probabilities.copy()
        calibrated[:, near] = self.apply(probabilities[:, near], axis=0)
        return calibrated


def fit_scaling(probabilities: np.ndarray, target: np.ndarray, method: str = "class_temperature",
                max_iter: int = 200) -> ProbabilityScaling:
    """The scaling that minimises the mean negative log-likelihood of ``target``.

    Args:
        probabilities: (N, K) class probabilities of N held-back predictions (voxels).
        target: (N,) integer classes 0..K−1.
        method: ``temperature`` (one shared a, b = 0), ``class_temperature`` (a per class, b = 0) or
            ``vector`` (a and b per class; the bias of class 0 fixed at 0, as only differences matter).
        max_iter: L-BFGS iterations.

    Returns:
        :class:`ProbabilityScaling`.
    """
    probabilities = np.asarray(probabilities)
    target = np.asarray(target).astype(np.int64).reshape(-1)
    if probabilities.ndim != 2 or probabilities.shape[0] != target.shape[0]:
        raise ValueError(f"probabilities must be (N, K) and target (N,), got {probabilities.shape} and {target.shape}")
    if method not in ("temperature", "class_temperature", "vector"):
        raise ValueError(f"method={method!r}: expected temperature, class_temperature or vector")
    classes = probabilities.shape[1]
    logp = torch.log(torch.from_numpy(np.maximum(probabilities, _FLOOR)).double())
    y = torch.from_numpy(target)
    # a = exp(log_a) stays positive: a negative temperature would invert the ranking of the classes.
    log_a = torch.zeros(1 if method == "temperature" else classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes - 1, dtype=torch.float64, requires_grad=method == "vector")
    optimiser = torch.optim.LBFGS([log_a, bias] if method == "vector" else [log_a], lr=0.5, max_iter=max_iter,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        full_bias = torch.cat([torch.zeros(1, dtype=torch.float64), bias])
        loss = torch.nn.functional.cross_entropy(log_a.exp() * logp + full_bias, y)
        loss.backward()
        return loss

    optimiser.step(closure)
    scale = log_a.detach().exp().expand(classes).numpy()
    full_bias = np.concatenate([[0.0], bias.detach().numpy()])
    return ProbabilityScaling(scale=tuple(float(v) for v in scale), bias=tuple(float(v) for v in full_bias))
