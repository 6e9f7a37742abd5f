"""Classification metrics for an ordinal stage such as CDR (classes 0..3 for 0, 0.5, 1, 2), via torchmetrics.

* accuracy: fraction of subjects in the right class (micro average);
* macro-F1: unweighted mean of per-class F1 over the classes that occur in the targets or the
  predictions (a class absent from both is left out, as in scikit-learn);
* quadratic-weighted Cohen's kappa: agreement beyond chance with disagreement weighted by the
  squared class distance (Cohen J., Psychol Bull 70 (1968) 213–220). The weights use the fixed
  scale 0..num_classes−1, so a class missing from a batch does not shrink the distances between
  the others (scikit-learn's default, ``labels=None``, would; pass ``labels=range(K)`` to compare).

Subjects whose target is missing (−1) are left out; with none left every metric is NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_cohen_kappa, multiclass_f1_score

#: Target value of a subject without a stage.
MISSING = -1


def ordinal_metrics(pred: Tensor, target: Tensor, num_classes: int = 4) -> dict[str, float]:
    """Accuracy, macro-F1 and quadratic-weighted kappa over subjects with a target.

    Args:
        pred: (B,) integer classes, or (B, K) class scores (probabilities or logits; argmax is taken).
        target: (B,) integer classes in 0..K−1, ``MISSING`` (−1) where unknown.
        num_classes: K.

    Returns:
        ``{"accuracy", "macro_f1", "qwk", "n"}``; ``n`` counts the subjects used.
    """
    pred = torch.as_tensor(pred)
    target = torch.as_tensor(target, device=pred.device).long().reshape(-1)
    if pred.shape[0] != target.shape[0]:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same length")
    present = target != MISSING
    pred, target = pred[present], target[present]
    n = int(present.sum())
    if n == 0:
        nan = float("nan")
        return {"accuracy": nan, "macro_f1": nan, "qwk": nan, "n": 0}
    return {
        "accuracy": float(multiclass_accuracy(pred, target, num_classes, average="micro")),
        "macro_f1": float(multiclass_f1_score(pred, target, num_classes, average="macro")),
        "qwk": float(multiclass_cohen_kappa(pred, target, num_classes, weights="quadratic")),
        "n": n,
    }
