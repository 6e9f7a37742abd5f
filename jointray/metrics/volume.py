"""Structure volumes in mm³, per-case volume errors, and agreement between two volume measurements.

Agreement between predicted and reference volumes over a cohort:

* **Bland–Altman**: bias (mean of pred − reference), SD of the differences (n − 1 denominator) and
  95 % limits of agreement bias ± 1.96·SD. Bland J.M., Altman D.G., "Statistical methods for
  assessing agreement between two methods of clinical measurement", Lancet 327 (1986) 307–310.
* **ICC(2,1)**: two-way random effects, absolute agreement, single measurement — Shrout & Fleiss's
  ICC(2,1), which is McGraw & Wong's ICC(A,1). From the two-way ANOVA of the n × k table of
  measurements (subjects × methods), with mean squares MSR (rows), MSC (columns), MSE (residual)::

      ICC(2,1) = (MSR − MSE) / (MSR + (k − 1)·MSE + k·(MSC − MSE)/n)

  Absolute agreement means a constant offset between methods lowers the ICC (consistency, ICC(3,1),
  would ignore it). Shrout P.E., Fleiss J.L., Psychol Bull 86 (1979) 420–428; McGraw K.O., Wong S.P.,
  Psychol Methods 1 (1996) 30–46.

Subjects with a NaN in any measurement are left out of both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from jointray.metrics.structures import Spacing, Structures, batch_spacing, structure_masks, structure_names

#: One measurement per subject: a 1-D tensor, array or sequence of floats.
Measurements = Tensor | np.ndarray | Sequence[float]

#: Two-sided 95 % normal quantile used for the limits of agreement, as in Bland & Altman (1986).
_Z95 = 1.96


def structure_volumes(label_map: Tensor, structures: Structures, spacing: Spacing) -> dict[str, Tensor]:
    """Volume of each structure in mm³: voxel count × voxel volume.

    Args:
        label_map: (B, X, Y, Z) integer.
        structures: labels to measure, ``{1: "anterior", 2: "posterior"}`` or ``[1, 2]``.
        spacing: voxel size in mm, (3,) or (B, 3).

    Returns:
        ``{"<name>": (B,) float64}`` on the CPU.
    """
    names = structure_names(structures)
    masks = structure_masks(label_map, list(names))
    counts = masks.sum((2, 3, 4), dtype=torch.float64).cpu()  # (B, S); float64 keeps counts exact
    voxel_mm3 = batch_spacing(spacing, masks.shape[0]).prod(dim=1)  # (B,)
    return {name: counts[:, s] * voxel_mm3 for s, name in enumerate(names.values())}


def volume_metrics(pred: Tensor, target: Tensor, structures: Structures, spacing: Spacing) -> dict[str, Tensor]:
    """Per-case predicted and reference volumes and their errors.

    Args:
        pred, target: (B, X, Y, Z) integer label maps on the same grid.
        structures: labels to measure.
        spacing: voxel size in mm, (3,) or (B, 3).

    Returns:
        (B,) float64 tensors keyed ``"volume_pred/<name>"``, ``"volume_ref/<name>"`` (mm³),
        ``"volume_abs_error/<name>"`` = |pred − ref| (mm³) and ``"volume_rel_error/<name>"`` =
        |pred − ref| / ref (a fraction; NaN where the reference is empty, since it is undefined).
    """
    predicted = structure_volumes(pred, structures, spacing)
    reference = structure_volumes(target, structures, spacing)
    out: dict[str, Tensor] = {}
    for name in predicted:
        abs_error = (predicted[name] - reference[name]).abs()
        out[f"volume_pred/{name}"] = predicted[name]
        out[f"volume_ref/{name}"] = reference[name]
        out[f"volume_abs_error/{name}"] = abs_error
        out[f"volume_rel_error/{name}"] = torch.where(
            reference[name] > 0, abs_error / reference[name], torch.tensor(float("nan"), dtype=torch.float64)
        )
    return out


@dataclass(frozen=True)
class BlandAltman:
    """Bland–Altman summary of pred − reference (units of the measurements)."""

    bias: float  # mean difference
    sd: float  # SD of the differences, n − 1 denominator
    lower: float  # bias − 1.96·SD
    upper: float  # bias + 1.96·SD
    n: int  # subjects used


def _complete_rows(*measurements: Measurements) -> np.ndarray:
    """(n, k) float64 table, one column per measurement, rows with any NaN dropped."""
    columns = [torch.as_tensor(m, dtype=torch.float64).detach().cpu().reshape(-1).numpy() for m in measurements]
    if len({len(c) for c in columns}) != 1:
        raise ValueError(f"measurements must have the same length, got {[len(c) for c in columns]}")
    table = np.stack(columns, axis=1)
    return table[~np.isnan(table).any(axis=1)]


def bland_altman(pred: Measurements, reference: Measurements) -> BlandAltman:
    """Bias, SD and 95 % limits of agreement of ``pred − reference``; both (n,). NaN where n < 2."""
    table = _complete_rows(pred, reference)
    diff = table[:, 0] - table[:, 1]
    n = len(diff)
    bias = float(diff.mean()) if n else float("nan")
    sd = float(diff.std(ddof=1)) if n >= 2 else float("nan")
    return BlandAltman(bias=bias, sd=sd, lower=bias - _Z95 * sd, upper=bias + _Z95 * sd, n=n)


def intraclass_correlation(*measurements: Measurements) -> float:
    """ICC(2,1) (absolute agreement, two-way random, single measurement) of k ≥ 2 methods.

    Args:
        measurements: k sequences of n values each, one per method, e.g. ``(pred_mm3, ref_mm3)``.

    Returns:
        The ICC, ≤ 1; 1 for identical measurements. NaN with fewer than 2 complete subjects or when
        the denominator is 0 (all values equal).
    """
    if len(measurements) < 2:
        raise ValueError("an ICC needs at least two measurements per subject")
    table = _complete_rows(*measurements)
    n, k = table.shape
    if n < 2:
        return float("nan")
    grand = table.mean()
    row_means = table.mean(axis=1, keepdims=True)
    col_means = table.mean(axis=0, keepdims=True)
    ms_rows = k * np.sum((row_means - grand) ** 2) / (n - 1)
    ms_cols = n * np.sum((col_means - grand) ** 2) / (k - 1)
    ms_error = np.sum((table - row_means - col_means + grand) ** 2) / ((n - 1) * (k - 1))
    denominator = ms_rows + (k - 1) * ms_error + k * (ms_cols - ms_error) / n
    return float((ms_rows - ms_error) / denominator) if denominator > 0 else float("nan")
