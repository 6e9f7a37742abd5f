"""A trained model (or an ensemble of them) applied to raw cases, exactly as training saw them, in three stages.

A :class:`Predictor` loads a training checkpoint, an exported artifact or an ensemble of them
(:mod:`jointray.artifacts`: the weights, the whole config, the PreprocessSpec and clinical schema they
were trained with, which outcome heads saw targets, and an ensemble's post-processing) and predicts
in three stages that a server can run in different places:

1. :meth:`Predictor.prepare` (CPU, :mod:`jointray.inference.cases`): a path, an upload's bytes, an
   array with its affine or a source's record → validated, preprocessed :class:`PreparedCase`.
2. :meth:`Predictor.forward` (the accelerator, :mod:`jointray.inference.forward`): a batch of prepared
   cases → probabilities, uncertainty and outcome samples, one vectorised call.
3. :meth:`Predictor.finish` (CPU): the class **probabilities** mapped back onto the input's own grid,
   then the argmax (nnU-Net's order: a thin structure survives a change of spacing), the ensemble's
   post-processing (:mod:`jointray.inference.postprocess`), volumes from the input affine's |det| (right
   for sheared DICOM geometry too), MC statistics and intervals.

``evaluate``, ``jointray predict`` and the server all run these stages; :meth:`Predictor.predict_batch`
composes them for batch evaluation. Inference precision is chosen for the device it runs on
(``inference.precision``), never inherited from training.
"""

from __future__ import annotations

import math
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jointray.artifacts import CheckpointError, load_models
from jointray.config import InferenceConfig
from jointray.data.errors import InputError
from jointray.data.preprocess import restore_to_original
from jointray.data.records import CaseRecord, Quarantined
from jointray.data.shards import CLINICAL_PREFIX
from jointray.export.runtime import load_graph_model
from jointray.inference.cases import CasePreparer, PreparedCase
from jointray.inference.forward import ForwardResult, ForwardSettings, mirror_sets, sliding_forward, window_forward
from jointray.inference.postprocess import keep_largest_component
from jointray.losses.ordinal import class_to_cdr
from jointray.metrics import reliability_bins, segmentation_metrics
from jointray.models import MC_MODES, build_model
from jointray.models.layout import image_in_layout, to_layout
from jointray.precision import autocast_for
from jointray.trust import quality as quality_features
from jointray.trust.conformal import ConformalInterval
from jointray.trust.ood import FEATURES as OOD_FEATURES
from jointray.trust.ood import image_features
from jointray.trust.ood import feature_key as ood_key
from jointray.trust.scaling import near_structures


#: How an interval was made: split-conformal normalised by the Monte Carlo SD, split-conformal with one
#: width for all, or the central interval of the Monte Carlo samples (no coverage guarantee).
INTERVAL_METHODS = ("conformal_normalised", "conformal", "monte_carlo")


#: The values a number can take: an interval is clipped to them.
VALUE_RANGE = {"mmse": (0.0, 30.0), "risk": (-math.inf, math.inf)}


@dataclass
class Estimate:
    """A number with its spread: the Monte Carlo samples' mean and SD and an interval; ``point`` is the
    deterministic pass's value (the one that ``evaluate`` scores). ``interval`` is split-conformal around
    ``point`` where the model is calibrated (``method`` one of :data:`INTERVAL_METHODS`), else the samples'
    central interval, which promises nothing."""

    point: float
    mean: float
    std: float
    interval: tuple[float, float]
    method: str = "monte_carlo"

    @classmethod
    def of(cls, point: float, samples: np.ndarray, level: float, conformal: ConformalInterval | None = None,
           normalise: bool = False, bounds: tuple[float, float] = (-math.inf, math.inf)) -> Estimate:
        """From the point value and the samples; with ``conformal`` its interval (σ-normalised with
        ``normalise``: the samples came as the calibration's did), clipped to the value's range ``bounds``."""
        samples = np.asarray(samples, dtype=np.float64)
        std = float(samples.std())
        if conformal is None:
            tail = (1.0 - level) / 2.0
            interval, method = np.quantile(samples, [tail, 1.0 - tail]), "monte_carlo"
        else:
            normalise = normalise and conformal.normalised
            interval = conformal.interval([point], [std] if normalise else None, level, low=bounds[0],
                                          high=bounds[1])[0]
            method = "conformal_normalised" if normalise else "conformal"
        return cls(point=float(point), mean=float(samples.mean()), std=std,
                   interval=(float(interval[0]), float(interval[1])), method=method)


@dataclass
class CasePrediction:
    """What the model says about one case.

    ``mask`` (X, Y, Z) uint8 and ``entropy`` (X, Y, Z) float32 on the input image's grid (``affine``), or
    None for a model without segmentation. ``volumes_mm3``: the mask's structure volumes;
    ``volume_estimates``: their MC estimates; ``outcomes``: point predictions under the keys ``evaluate``
    reports (``pred_mmse``, ``pred_cdr``, ``pred_cdr_stage``, ``pred_risk``); ``outcome_estimates``:
    ``mmse`` and ``risk`` as :class:`Estimate`, ``cdr`` as stage → mean probability; ``uncertainty``:
    mean entropy and mutual information inside each predicted structure; ``reliability``, on labelled
    cases: :func:`~jointray.metrics.calibration.reliability_bins` of the voxel probabilities against the
    reference, over ``all`` voxels of the input grid, over the ``foreground`` (voxels that the
    prediction or the reference calls a structure: the rest is confident background) and over the
    ``predicted`` foreground (voxels the prediction calls a structure). The foreground is chosen with the
    reference's help, so even perfectly calibrated probabilities score an ECE above 0 there (a voxel the
    model rightly gave 10 % enters only when it is the one in ten that is a structure); the predicted
    foreground is chosen by the prediction alone and has no such floor. ``quality_features``
    (structure → :data:`jointray.trust.quality.FEATURES`) and ``ood_features``
    (:data:`jointray.trust.ood.FEATURES`) are what a calibration is fitted on and applied to;
    ``predicted_dice`` (structure → Dice) and ``ood_p`` (the conformal p-value of the input being like the
    calibration cases) come from a calibrated model (NaN otherwise). ``voxels``: on labelled cases when the
    predictor collects them, a sample of (uncalibrated probabilities (N, K), reference labels (N,)) near the
    structures, for fitting the voxel calibration.
    """

    record: CaseRecord | None
    name: str
    mask: np.ndarray | None
    affine: np.ndarray
    entropy: np.ndarray | None = None
    volumes_mm3: dict[str, float] = field(default_factory=dict)
    volume_estimates: dict[str, Estimate] = field(default_factory=dict)
    outcomes: dict[str, float] = field(default_factory=dict)
    outcome_estimates: dict[str, Any] = field(default_factory=dict)
    uncertainty: dict[str, dict[str, float]] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    path: str = "window"
    mc_samples: int = 1
    mc_mode: str = "heads"
    seconds: dict[str, float] = field(default_factory=dict)
    reliability: dict[str, np.ndarray] = field(default_factory=dict)
    quality_features: dict[str, dict[str, float]] = field(default_factory=dict)
    ood_features: dict[str, float] = field(default_factory=dict)
    predicted_dice: dict[str, float] = field(default_factory=dict)
    ood_p: float = math.nan
    voxels: tuple[np.ndarray, np.ndarray] | None = None

    def row(self) -> dict[str, Any]:
        """One flat per-case row: volumes, predictions, targets, errors and metrics (NaN = not available).

        The keys are those that :func:`jointray.metrics.cohort.validation_metrics` summarises, and
        ``entropy/<name>`` and ``mutual_information/<name>`` per structure, ``prob_cdr/<stage>``, with
        ``mc_samples`` > 1 or a conformal interval the intervals (``volume_low/<name>``, ``volume_high/<name>``,
        ``pred_mmse_low``, ``pred_mmse_high``, ``pred_risk_low``, ``pred_risk_high``) and the Monte Carlo SDs
        (``volume_sd/<name>``, ``pred_mmse_sd``, ``pred_risk_sd``), ``cdr_set`` (a calibrated model's
        conformal set of stages, joined by ``|``), the features of a calibration
        (:func:`jointray.trust.quality.feature_key`, :func:`jointray.trust.ood.feature_key`),
        ``predicted_dice/<name>`` and ``ood_p``, and ``label`` (the reference's path).
        """
        record = self.record
        row: dict[str, Any] = {"subject_id": record.subject_id if record else self.name,
                               "image": record.images[0] if record else self.name,
                               "has_label": bool(record and record.label is not None)}
        row |= {f"volume/{name}": v for name, v in self.volumes_mm3.items()}
        for name, figures in self.uncertainty.items():
            row |= {f"{kind}/{name}": value for kind, value in figures.items()}
        row |= self.outcomes
        estimates = [(f"volume_{{}}/{name}", e) for name, e in self.volume_estimates.items()]
        estimates += [(f"pred_{name}_{{}}", self.outcome_estimates[name]) for name in ("mmse", "risk")
                      if name in self.outcome_estimates]
        for key, estimate in estimates:
            # One Monte Carlo pass has no spread: its own interval would be a point.
            if self.mc_samples > 1 or estimate.method != "monte_carlo":
                row[key.format("low")], row[key.format("high")] = estimate.interval
            if self.mc_samples > 1:
                row[key.format("sd")] = estimate.std
        if "cdr" in self.outcome_estimates:
            row |= {f"prob_cdr/{stage}": p for stage, p in self.outcome_estimates["cdr"]["probabilities"].items()}
            if "set" in self.outcome_estimates["cdr"]:
                row["cdr_set"] = "|".join(self.outcome_estimates["cdr"]["set"])
        for name, features in self.quality_features.items():
            row |= {quality_features.feature_key(name, f): v for f, v in features.items()}
        row |= {ood_key(f): v for f, v in self.ood_features.items()}
        row |= {f"predicted_dice/{name}": v for name, v in self.predicted_dice.items()}
        if math.isfinite(self.ood_p):
            row["ood_p"] = self.ood_p
        row["mc_samples"] = self.mc_samples
        if record is not None and record.label is not None:
            row["label"] = record.label
        for name in ("mmse", "cdr", "time", "event"):
            value = record.targets.get(name) if record else None
            row[name] = math.nan if value is None else float(value)
        if "pred_mmse" in row:
            row["mmse_abs_error"] = abs(row["pred_mmse"] - row["mmse"])
        if "pred_cdr_stage" in row:
            row["cdr_correct"] = math.nan if math.isnan(row["cdr"]) else float(row["pred_cdr_stage"] == row["cdr"])
        return row | self.metrics


def _entropy(probabilities: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) over the class axis 0 of (K, ...) probabilities, float32."""
    p = probabilities.astype(np.float32)
    return -(p * np.log(np.maximum(p, 1e-12))).sum(0)


def calibration_voxels(probabilities: np.ndarray, label: np.ndarray, limit: int,
                       name: str) -> tuple[np.ndarray, np.ndarray]:
    """A sample of at most ``limit`` voxels of one labelled case for fitting a voxel calibration: those near the
    structures the prediction (probabilities (K, X, Y, Z)) draws (:func:`jointray.trust.scaling.near_structures`:
    where a calibration applies), drawn uniformly (seeded by ``name``), with the reference ``label`` there.
    Returns (N, K) float32 and (N,) int64."""
    index = np.flatnonzero(near_structures(probabilities))
    if len(index) > limit:
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        index = np.sort(rng.choice(index, limit, replace=False))
    flat = probabilities.reshape(len(probabilities), -1)
    return np.ascontiguousarray(flat[:, index].T, dtype=np.float32), label.reshape(-1)[index].astype(np.int64)


def clinical_columns(cases: list[PreparedCase], schema) -> dict[str, Any]:
    """The ``clin_*`` columns that :meth:`ClinicalSchema.encode` reads, from the cases' checked clinical values."""
    columns: dict[str, Any] = {}
    for feature in schema.numeric:
        values = [case.clinical.get(feature.name) for case in cases]
        columns[CLINICAL_PREFIX + feature.name] = np.asarray([math.nan if v is None else v for v in values], np.float64)
    for feature in schema.categorical:
        columns[CLINICAL_PREFIX + feature.name] = [case.clinical.get(feature.name) for case in cases]
    return columns


class Predictor:
    """A trained model, or several answering as one, ready to predict; ``device`` defaults to CUDA when available.

    ``checkpoint``: a checkpoint, an exported model, an ensemble folder or a list of these (see
    :func:`~jointray.artifacts.load_models`); the first model's config rules preprocessing and inference.
    ``inference`` overrides that config's ``inference`` section (mirroring, MC defaults and limits,
    sliding-window overlap, precision). ``mirror=False`` is ``--no-tta``.
    """

    def __init__(self, checkpoint: str | Path | list[str | Path], device: str | torch.device | None = None,
                 inference: InferenceConfig | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        ensemble = load_models(checkpoint, map_location=self.device)
        artifact = ensemble.members[0]
        self.version, self.metrics = ensemble.version, ensemble.metrics
        self.calibration = ensemble.calibration
        #: Labelled cases hand back at most this many voxels for fitting a calibration (0: none).
        self.collect_voxels = 0
        self.config, self.spec, self.schema = artifact.config, artifact.spec, artifact.schema
        self.inference = inference or self.config.inference
        self.runtimes = runtimes = sorted({member.runtime for member in ensemble.members})
        if self.inference.runtime != "auto" and runtimes != [self.inference.runtime]:
            raise CheckpointError(f"inference.runtime={self.inference.runtime} but the model runs on "
                                  f"{', '.join(runtimes)} (`jointray export --format onnx|torchscript` writes a graph)")
        self.models = []
        for member in ensemble.members:
            if member.runtime != "torch":
                self.models.append(load_graph_model(member, self.device))
                continue
            model = to_layout(build_model(member.config.model, self.spec.channels, self.schema).to(self.device),
                              member.config.train.channels_last)
            model.load_state_dict(member.state_dict)
            self.models.append(model.eval())
        # A graph samples its whole network or nothing (jointray.export.runtime).
        self.mc_modes = MC_MODES if runtimes == ["torch"] else ("full",)
        self.schemas = [member.schema for member in ensemble.members]  # each fold normalises its own way
        self.trained_heads = artifact.trained_heads
        self.cross = artifact.cross
        self.structures = {k: v for k, v in self.config.data.label_names.items() if k != 0}
        self.largest_component = [k for k, name in self.structures.items() if name in ensemble.largest_component]
        self.autocast, _ = autocast_for(self.inference.precision, self.device)
        augment = self.config.train.augment
        mirrored = self.inference.mirror and augment.enabled and augment.flip_prob > 0
        self.settings = ForwardSettings(cross=self.cross, mirrors=mirror_sets(augment.flip_axes) if mirrored else [],
                                        chunk_cases=self.inference.chunk_cases, autocast=self.autocast,
                                        channels_last=self.config.train.channels_last)
        self.preparer = CasePreparer(self.spec, self.schema, set(self.config.data.label_names),
                                     self.config.data.max_voxels)

    # -- stage 1 ---------------------------------------------------------------------------------------------
    def prepare(self, source: CaseRecord | str | Path | bytes | tuple[np.ndarray, np.ndarray],
                clinical: dict[str, Any] | None = None, name: str | None = None,
                max_bytes: int | None = None) -> PreparedCase:
        """Validate and preprocess one input (see :mod:`jointray.inference.cases`); raises InputError."""
        if isinstance(source, CaseRecord):
            return self.preparer.record(source)
        if isinstance(source, (bytes, bytearray, memoryview)):
            return self.preparer.upload(bytes(source), name or "upload", clinical, max_bytes)
        if isinstance(source, tuple):
            return self.preparer.array(source[0], source[1], name or "array", clinical)
        return self.preparer.path(source, clinical)

    def check_mc(self, mc_samples: int | None, mc_mode: str | None) -> tuple[int, str]:
        """The request's MC settings, defaulted from the calibration (the settings its guarantees hold for) or
        the config, and checked against the limits (ValueError)."""
        defaults = self.calibration.settings if self.calibration is not None else self.inference
        samples = defaults.mc_samples if mc_samples is None else mc_samples
        mode = mc_mode or (defaults.mc_mode if defaults.mc_mode in self.mc_modes else self.mc_modes[0])
        limit = self.inference.max_mc_samples
        if isinstance(samples, bool) or not isinstance(samples, int) or not 1 <= samples <= limit:
            raise ValueError(f"mc_samples={samples!r}: expected an integer from 1 to {self.inference.max_mc_samples}")
        if mode not in self.mc_modes:
            raise ValueError(f"mc_mode={mode!r}: expected one of {list(self.mc_modes)}"
                             + (" (an exported graph samples its whole network)" if mode in MC_MODES else ""))
        return samples, mode

    # -- stage 2 ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, cases: list[PreparedCase], mc_samples: int | None = None,
                mc_mode: str | None = None) -> list[ForwardResult]:
        """Predict prepared cases: the window-shaped ones as one batch, larger ones by sliding window."""
        samples, mode = self.check_mc(mc_samples, mc_mode)
        results: list[ForwardResult | None] = [None] * len(cases)
        windowed = [i for i, c in enumerate(cases) if c.path == "window"]
        for i in (i for i, c in enumerate(cases) if c.path != "window"):
            image, clinical, vv, inside = self.tensors([cases[i]])
            results[i] = sliding_forward(self.models, image, clinical, vv, inside, tuple(self.spec.target_shape),
                                         samples, mode, self.inference.overlap, self.inference.sigma_scale,
                                         self.spec.pad_value, self.settings)
        if windowed:
            image, clinical, vv, inside = self.tensors([cases[i] for i in windowed])
            for i, result in zip(windowed, window_forward(self.models, image, clinical, vv, inside, samples, mode,
                                                          self.settings)):
                results[i] = result
        return results  # type: ignore[return-value]

    def tensors(self, cases: list[PreparedCase]):
        """(image, clinical per member, voxel volumes, inside-the-input masks) of prepared cases, on the device."""
        image = image_in_layout(torch.from_numpy(np.stack([c.image for c in cases])).to(self.device),
                                self.config.train.channels_last)
        columns = clinical_columns(cases, self.schema)
        clinical = [schema.encode(columns, len(cases)).to(self.device) for schema in self.schemas]
        vv = torch.tensor([abs(np.linalg.det(c.geometry.affine[:3, :3])) for c in cases], dtype=torch.float32,
                          device=self.device)
        inside = torch.from_numpy(np.stack([self._inside(c) for c in cases])).to(self.device)
        return image, clinical, vv, inside

    # -- stage 3 ---------------------------------------------------------------------------------------------
    def finish(self, case: PreparedCase, result: ForwardResult, samples: int, mode: str,
               entropy_map: bool = False) -> CasePrediction:
        """Map ``result`` back onto the input's grid and summarise it (see the module docstring)."""
        started = time.perf_counter()
        geometry, level = case.geometry, self.inference.interval
        prediction = CasePrediction(record=case.record, name=case.name, mask=None, affine=geometry.original_affine,
                                    path=result.path, mc_samples=samples, mc_mode=mode)
        point, drawn = result.outcome_point, result.outcome_samples
        calibration = self.calibration
        matched = calibration is not None and calibration.settings_match(self.inference.mirror, samples, mode)
        for name in ("mmse", "risk"):
            if name in point and name in self.trained_heads:
                prediction.outcomes[f"pred_{name}"] = point[name]
                conformal = calibration.mmse if calibration is not None and name == "mmse" else None
                prediction.outcome_estimates[name] = Estimate.of(point[name], drawn[name], level, conformal,
                                                                 matched and samples > 1, VALUE_RANGE.get(name))
        if "pred_risk" in prediction.outcomes and calibration is not None and calibration.risk is not None:
            absolute = calibration.risk
            probability = float(absolute.probability(prediction.outcomes["pred_risk"]))
            prediction.outcomes["pred_risk_probability"] = probability
            prediction.outcome_estimates["risk_by_horizon"] = {"horizon": absolute.horizon,
                                                               "probability": probability}
        if "cdr_class" in point and "cdr" in self.trained_heads:
            stage = float(class_to_cdr(torch.tensor([point["cdr_class"]]))[0])
            prediction.outcomes |= {"pred_cdr": float(point["cdr_class"]), "pred_cdr_stage": stage}
            stages = [f"{s:g}" for s in class_to_cdr(torch.arange(len(point["cdr_probabilities"]))).tolist()]
            mean = drawn["cdr"].mean(0)
            prediction.outcome_estimates["cdr"] = {"stage": stage,
                                                  "probabilities": {s: float(p) for s, p in zip(stages, mean)}}
            if calibration is not None and calibration.cdr is not None:
                chosen = calibration.cdr.sets(mean, level)[0]
                prediction.outcome_estimates["cdr"]["set"] = [s for s, keep in zip(stages, chosen) if keep]
        if result.probabilities is not None:
            self._finish_segmentation(case, result, prediction, entropy_map, level, matched and samples > 1)
        prediction.seconds = dict(case.seconds) | {"finish": time.perf_counter() - started}
        return prediction

    def _finish_segmentation(self, case: PreparedCase, result: ForwardResult, prediction: CasePrediction,
                             entropy_map: bool, level: float, normalise: bool) -> None:
        geometry, calibration = case.geometry, self.calibration
        raw = result.probabilities
        scaling = calibration.scaling if calibration is not None else None
        # The calibration rescales the probabilities on the prepared grid, before they are mapped back: the
        # map, the entropy and the features below are all the calibrated model's.
        calibrated = scaling.apply_near(raw) if scaling is not None else raw
        entropy = _entropy(calibrated) if scaling is not None else result.entropy
        probabilities = restore_to_original(calibrated, geometry, mode="linear")
        mask_source = raw if scaling is not None and not calibration.mask_calibrated else calibrated
        decided = probabilities if mask_source is calibrated else restore_to_original(raw, geometry, mode="linear")
        prediction.mask = keep_largest_component(decided.argmax(0).astype(np.uint8), self.largest_component)
        if entropy_map:
            prediction.entropy = restore_to_original(entropy, geometry, mode="linear").astype(np.float32)
        voxel_mm3 = abs(float(np.linalg.det(geometry.original_affine[:3, :3])))
        counts = np.bincount(prediction.mask.ravel(), minlength=max(self.structures) + 1)
        inside = self._inside(case)
        winner = np.where(inside, mask_source.argmax(0), 0)
        for k, name in self.structures.items():
            prediction.volumes_mm3[name] = float(counts[k]) * voxel_mm3
            conformal = calibration.volume.get(name) if calibration is not None else None
            estimate = Estimate.of(prediction.volumes_mm3[name], result.sample_volumes[:, k - 1], level, conformal,
                                   normalise, (0.0, math.inf))
            prediction.volume_estimates[name] = estimate
            structure = winner == k
            found = bool(structure.any())
            prediction.uncertainty[name] = {
                "entropy": float(entropy[structure].mean()) if found else math.nan,
                "mutual_information": float(result.mutual_information[structure].mean()) if found else math.nan,
            }
            p = calibrated[k][inside]
            prediction.quality_features[name] = {
                "expected_dice": 2 * float(calibrated[k][structure].sum()) / (float(p.sum()) + int(structure.sum()))
                if found else math.nan,
                "entropy": prediction.uncertainty[name]["entropy"],
                "mutual_information": prediction.uncertainty[name]["mutual_information"],
                "disagreement": 1.0 - float(result.sample_dice[k - 1]) if result.sample_dice is not None and found
                else (0.0 if found else math.nan),
                "volume_cv": estimate.std / estimate.mean if estimate.mean > 0 else (0.0 if found else math.nan),
                "log_volume": math.log(prediction.volumes_mm3[name]) if prediction.volumes_mm3[name] > 0 else math.nan,
            }
        worst = min((f["expected_dice"] for f in prediction.quality_features.values()), default=math.nan)
        if case.original is not None:  # the input as it came: every prepared input keeps it
            prediction.ood_features = image_features(case.original[0]) | {
                "foreground_fraction": float((prediction.mask > 0).mean()),
                "expected_dice": worst if math.isfinite(worst) else 0.0}
        if calibration is not None:
            self._apply_quality(prediction)
        if case.label is not None:
            self._score(case, prediction, probabilities, voxel_mm3)

    def _apply_quality(self, prediction: CasePrediction) -> None:
        calibration = self.calibration
        if calibration.quality is not None:
            names = list(prediction.quality_features)
            dice = calibration.quality.predict(quality_features.features_of(
                {quality_features.feature_key(n, f): v for n in names
                 for f, v in prediction.quality_features[n].items()}, names))
            prediction.predicted_dice = {name: float(d) for name, d in zip(names, dice)}
        if calibration.ood is not None and prediction.ood_features:
            prediction.ood_p = calibration.ood.p_value(np.array([prediction.ood_features[f] for f in OOD_FEATURES]))

    def _score(self, case: PreparedCase, prediction: CasePrediction, probabilities: np.ndarray,
               voxel_mm3: float) -> None:
        """Metrics against the reference label, the voxel reliability bins and, when collecting, a voxel sample."""
        geometry = case.geometry
        spacing = geometry.original_spacing
        seg = segmentation_metrics(torch.from_numpy(prediction.mask[None]), torch.from_numpy(case.label[None]),
                                   self.structures, spacing, distances=("hd95",))
        prediction.metrics = {k: float(v[0]) for k, v in seg.items() if k.split("/")[0] in ("dice", "hd95")}
        ref = np.bincount(case.label.ravel(), minlength=max(self.structures) + 1)
        prediction.metrics |= {f"volume_ref/{name}": float(ref[k]) * voxel_mm3
                               for k, name in self.structures.items()}
        voxels = torch.from_numpy(np.ascontiguousarray(probabilities.reshape(len(probabilities), -1).T))
        label = torch.from_numpy(case.label.reshape(-1).astype(np.int64))
        predicted = torch.from_numpy((probabilities.argmax(0) > 0).reshape(-1))
        foreground = predicted | torch.from_numpy((case.label > 0).reshape(-1))
        prediction.reliability = {"all": reliability_bins(voxels, label),
                                  "foreground": reliability_bins(voxels[foreground], label[foreground]),
                                  "predicted": reliability_bins(voxels[predicted], label[predicted])}
        if self.collect_voxels > 0:
            prediction.voxels = calibration_voxels(probabilities, case.label, self.collect_voxels, case.name)

    @staticmethod
    def _inside(case: PreparedCase) -> np.ndarray:
        g, shape = case.geometry, case.image.shape[1:]
        inside = np.zeros(shape, dtype=bool)
        box = (slice(max(0, -s), min(t, n - s)) for s, t, n in zip(g.crop_start, shape, g.resampled_shape))
        inside[tuple(box)] = True
        return inside

    def review(self, prediction: CasePrediction) -> tuple[bool, list[str]]:
        """Whether a person should look at this case, and why.

        A calibrated model (:mod:`jointray.trust`) flags an input unlike its calibration cases (conformal
        p-value at most ``ood_alpha``), a structure not found, and a predicted worst-structure Dice below the
        risk-controlled threshold; its sentences say what that guarantees. An uncalibrated one falls back on
        fixed limits that guarantee nothing: a structure not found, a MC volume SD above
        ``inference.review_volume_cv`` of its mean, a mean entropy above ``inference.review_entropy``."""
        calibration, reasons = self.calibration, []
        if calibration is not None and math.isfinite(prediction.ood_p) and prediction.ood_p <= calibration.ood_alpha:
            features = np.array([prediction.ood_features[f] for f in OOD_FEATURES])
            reasons.append(f"input unlike the calibration cases (p = {prediction.ood_p:.3f}): "
                           f"{calibration.ood.reason(features)}")
        limits = self.inference
        for name, volume in prediction.volumes_mm3.items():
            estimate, entropy = prediction.volume_estimates[name], prediction.uncertainty[name]["entropy"]
            if volume == 0:
                reasons.append(f"{name}: not found")
                continue
            if calibration is not None:
                continue
            if estimate.mean > 0 and estimate.std / estimate.mean > limits.review_volume_cv:
                reasons.append(f"{name}: volume SD {estimate.std / estimate.mean:.0%} of its mean > "
                               f"{limits.review_volume_cv:.0%}")
            if entropy > limits.review_entropy:
                reasons.append(f"{name}: mean entropy {entropy:.2f} > {limits.review_entropy:g} nats")
        if calibration is not None and prediction.predicted_dice:
            name, worst = min(prediction.predicted_dice.items(), key=lambda item: item[1])
            if worst < calibration.review_threshold:
                reasons.append(f"predicted Dice {worst:.2f} ({name}) below the review threshold "
                               f"{calibration.review_threshold:.3f}")
        return bool(reasons), reasons

    # -- all three, for batch evaluation ---------------------------------------------------------------------
    def predict(self, record: CaseRecord) -> CasePrediction | Quarantined:
        return self.predict_batch([record])[0]

    def predict_batch(self, records: list[CaseRecord], mc_samples: int = 1,
                      mc_mode: str | None = None) -> list[CasePrediction | Quarantined]:
        """Prepare, predict and finish ``records``; a case that fails validation or preprocessing comes back
        as a :class:`Quarantined` in its place. One deterministic pass per case unless ``mc_samples`` > 1."""
        samples, mode = self.check_mc(mc_samples, mc_mode)
        results: list[CasePrediction | Quarantined | None] = [None] * len(records)
        ready: list[tuple[int, PreparedCase]] = []
        for i, record in enumerate(records):
            try:
                ready.append((i, self.prepare(record)))
            except InputError as exc:
                stage = "preprocess" if exc.reason.startswith("preprocessing failed") else "validate"
                results[i] = Quarantined(record.subject_id, exc.path, exc.reason, stage)
        if ready:
            outputs = self.forward([case for _, case in ready], samples, mode)
            for (i, case), output in zip(ready, outputs):
                results[i] = self.finish(case, output, samples, mode)
        return results  # type: ignore[return-value]
