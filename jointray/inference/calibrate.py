"""``jointray calibrate``: fit a model's :class:`~jointray.trust.Calibration` on held-back labelled cases.

The cases must be disjoint from those that trained the model and chose its checkpoint (a calibration
split; the held-out test cases stay for reporting). Two passes of :func:`~jointray.inference.evaluate.evaluate`:

1. one deterministic pass (with the mirroring asked for) that hands back, per case, the voxels near
   the predicted structures (where a scaling applies) with their probabilities and reference labels. The voxel scaling
   (:mod:`jointray.trust.scaling`) is chosen among ``temperature``, ``class_temperature`` and ``vector``
   by the negative log-likelihood of each fitted on half of the cases and scored on the other half (both
   ways round), then refitted on all of them; the mask becomes the calibrated argmax only where that does
   not lower the cases' mean Dice;
2. a pass with the scaling applied, under the Monte Carlo settings the served model will use, whose
   per-case rows fit the intervals, the quality model with its review threshold and the
   out-of-distribution test (:func:`~jointray.trust.fit_calibration`).

The result is an ensemble folder (:mod:`jointray.artifacts`) listing the model's members with the
calibration in its ``ensemble.json``: ``evaluate``, ``predict`` and ``serve`` take it like any model.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import torch

from jointray.artifacts import ENSEMBLE_FILE, ensemble_manifest, load_models, local_model, write_ensemble
from jointray.config import ConfigError
from jointray.inference.evaluate import evaluate
from jointray.losses.ordinal import class_to_cdr
from jointray.trust.calibration import Calibration, InferenceSettings, fit_calibration
from jointray.trust.scaling import ProbabilityScaling, fit_scaling

SCALING_METHODS = ("temperature", "class_temperature", "vector")
#: Voxels each case contributes to the scaling fit, and the most the fit uses in all.
VOXELS_PER_CASE = 20_000
MAX_VOXELS = 1_000_000


def _nll(scaling: ProbabilityScaling, probabilities: np.ndarray, target: np.ndarray) -> float:
    calibrated = scaling.apply(probabilities.astype(np.float64), axis=1)
    return float(-np.log(np.maximum(calibrated[np.arange(len(target)), target], 1e-12)).mean())


def _pooled(cases: list[tuple[np.ndarray, np.ndarray]], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    probabilities = np.concatenate([p for p, _ in cases])
    target = np.concatenate([t for _, t in cases])
    if len(target) > MAX_VOXELS:
        keep = np.random.default_rng(seed).choice(len(target), MAX_VOXELS, replace=False)
        probabilities, target = probabilities[keep], target[keep]
    return probabilities, target


def choose_scaling(cases: list[tuple[np.ndarray, np.ndarray]], seed: int = 0) -> tuple[str, dict[str, float]]:
    """The scaling method with the lowest held-out NLL over two halves of the cases (each half scored by the
    fit on the other), and every method's held-out NLL (``none`` too)."""
    order = np.random.default_rng(seed).permutation(len(cases))
    halves = [[cases[i] for i in order[: len(cases) // 2]], [cases[i] for i in order[len(cases) // 2:]]]
    scores = {"none": 0.0} | {method: 0.0 for method in SCALING_METHODS}
    for fit_half, score_half in (halves, halves[::-1]):
        fit_p, fit_t = _pooled(fit_half, seed)
        score_p, score_t = _pooled(score_half, seed)
        scores["none"] += _nll(ProbabilityScaling.identity(fit_p.shape[1]), score_p, score_t) / 2
        for method in SCALING_METHODS:
            scores[method] += _nll(fit_scaling(fit_p, fit_t, method), score_p, score_t) / 2
    return min(scores, key=scores.get), scores


def sample_dice(cases: list[tuple[np.ndarray, np.ndarray]], scaling: ProbabilityScaling | None) -> float:
    """Mean per-structure Dice of the argmax over the cases' voxel samples (every voxel near a predicted
    structure, unless a case had more than its share: where a scaling can change the argmax), with ``scaling``
    applied."""
    dice = []
    for probabilities, target in cases:
        p = scaling.apply(probabilities, axis=1) if scaling is not None else probabilities
        predicted = p.argmax(1)
        for k in range(1, p.shape[1]):
            total = int((predicted == k).sum() + (target == k).sum())
            if total:
                dice.append(2 * int(((predicted == k) & (target == k)).sum()) / total)
    return float(np.mean(dice)) if dice else math.nan


def calibrate(checkpoint: str | Path, data: str | Path, out: str | Path, level: float = 0.9,
              failure_dice: float = 0.8, review_alpha: float = 0.05, ood_alpha: float = 0.02,
              scaling: str = "auto", tta: bool = True, mc_samples: int = 1, mc_mode: str | None = None,
              workers: int | None = None, labels: str | Path | None = None) -> tuple[Calibration, Path]:
    """Fit the calibration of ``checkpoint`` (a model or an ensemble) on the labelled cases of ``data`` and write
    the calibrated model to ``out`` (see the module docstring); needs a Ray instance. ``scaling``: ``auto`` (by
    held-out NLL), ``none`` or one of :data:`SCALING_METHODS`. Returns the calibration and ``out``."""
    if scaling not in ("auto", "none", *SCALING_METHODS):
        raise ConfigError(f"scaling={scaling!r}: expected auto, none or one of {list(SCALING_METHODS)}")
    source = local_model(checkpoint)
    largest, members, cross_validation = [], [source], {}
    if (source / ENSEMBLE_FILE).is_file():
        members, largest, metrics, _ = ensemble_manifest(source)
        cross_validation = {k.removeprefix("out_of_fold/"): v for k, v in metrics.items()}
    ensemble = load_models([str(m) for m in members])
    cfg = ensemble.members[0].config
    structures = [name for k, name in cfg.data.label_names.items() if k != 0]
    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "model"
        write_ensemble(staged, members, largest, cross_validation)
        first = evaluate(staged, data, Path(tmp) / "deterministic", labels=labels, workers=workers, tta=tta,
                         mc_samples=1, collect_voxels=VOXELS_PER_CASE)
        cases = list(first.voxels.values())
        if len(cases) < 2:
            raise ConfigError(f"{data}: {len(cases)} labelled case(s) predicted; a calibration needs labelled "
                              "cases (dozens, disjoint from training and checkpoint choice)")
        scores: dict[str, float] = {}
        method = scaling
        if scaling == "auto":
            method, scores = choose_scaling(cases)
        fitted = fit_scaling(*_pooled(cases), method) if method != "none" else None
        dice_before, dice_after = sample_dice(cases, None), sample_dice(cases, fitted)
        mask_calibrated = fitted is not None and dice_after >= dice_before
        settings = InferenceSettings(mirror=tta, mc_samples=mc_samples, mc_mode=mc_mode or cfg.inference.mc_mode)
        scaled = Calibration(settings=settings, cases=len(cases), scaling=fitted, scaling_method=method,
                             mask_calibrated=mask_calibrated)
        write_ensemble(staged, members, largest, cross_validation, calibration=scaled)
        second = evaluate(staged, data, Path(tmp) / "sampled", labels=labels, workers=workers, tta=tta,
                          mc_samples=mc_samples, mc_mode=settings.mc_mode)
    fit_metrics = {f"heldout_nll/{k}": v for k, v in scores.items()} | {
        "sample_dice/uncalibrated": dice_before, "sample_dice/calibrated": dice_after,
        **{f"voxel_ece/{region}/uncalibrated": first.metrics.get(f"voxel_ece/{region}", math.nan)
           for region in ("all", "foreground")},
        **{f"voxel_ece/{region}/calibrated": second.metrics.get(f"voxel_ece/{region}", math.nan)
           for region in ("all", "foreground")}}
    stages = ([f"{s:g}" for s in class_to_cdr(torch.arange(cfg.model.cdr_classes)).tolist()]
              if "cdr" in ensemble.members[0].trained_heads else None)
    calibration = fit_calibration(second.rows, structures, settings, level, fitted, method, mask_calibrated,
                                  failure_dice, review_alpha, ood_alpha, stages, data=str(data),
                                  fit_metrics=fit_metrics)
    write_ensemble(out, [Path(m).resolve() for m in members], largest, cross_validation, calibration=calibration)
    return calibration, out

