"""One trained checkpoint applied to raw cases, exactly as training saw them.

A :class:`Predictor` loads a checkpoint folder (the model, the whole config, the PreprocessSpec and
the clinical schema it was trained with) and turns :class:`~jointray.data.records.CaseRecord` s —
paths to NIfTI/DICOM images, an optional label, clinical values, optional targets — into
:class:`CasePrediction` s: the predicted label map on the input's own voxel grid, structure volumes
in mm³, the outcome predictions, and, where a reference label or targets exist, the per-case
metrics. Validation and preprocessing are the training code itself (``load_case``,
``preprocess_case`` with the checkpoint's spec, ``restore_to_original``), so a served or evaluated
case goes through exactly what the shards went through.

Inference never looks at a reference label to place the crop window: a case is cropped around the
image centre (``preprocess_case(..., label=None)``); the label is only used to score the result.
For volumes that fit ``preprocess.target_shape`` (MSD hippocampus, the synthetic cohort) the
window is pure padding and this changes nothing.

Batch evaluation (:mod:`jointray.inference.evaluate`) runs one Predictor per Ray Data actor; the
serving deployment runs one per replica. Both call :meth:`Predictor.predict_batch`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jointray.config import Config
from jointray.data.clinical import ClinicalSchema
from jointray.data.errors import InputError
from jointray.data.preprocess import Geometry, preprocess_case, restore_to_original
from jointray.data.records import CaseRecord, Quarantined
from jointray.data.shards import CLINICAL_PREFIX
from jointray.data.validate import load_case
from jointray.losses.ordinal import class_to_cdr
from jointray.metrics import segmentation_metrics
from jointray.models import build_model
from jointray.models.layout import image_in_layout, to_layout
from jointray.precision import autocast_for
from jointray.train.checkpoint import read_checkpoint
from jointray.train.curriculum import Curriculum


@dataclass
class CasePrediction:
    """What the model says about one case. ``mask`` is (X, Y, Z) uint8 on the input image's grid
    (``affine``), or None for a model without a segmentation head."""

    record: CaseRecord
    mask: np.ndarray | None
    affine: np.ndarray
    volumes_mm3: dict[str, float] = field(default_factory=dict)
    outcomes: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        """One flat per-case row: volumes, predictions, targets, errors and metrics (NaN = not available).

        The keys ``has_label``, ``dice/<s>``, ``hd95/<s>``, ``pred_mmse``, ``pred_cdr`` (class),
        ``pred_risk``, ``mmse``, ``cdr``, ``time``, ``event`` are those that
        :func:`jointray.train.validation.validation_metrics` summarises.
        """
        row: dict[str, Any] = {"subject_id": self.record.subject_id, "image": self.record.images[0],
                               "has_label": self.record.label is not None}
        row |= {f"volume/{name}": v for name, v in self.volumes_mm3.items()}
        row |= self.outcomes
        for name in ("mmse", "cdr", "time", "event"):
            value = self.record.targets.get(name)
            row[name] = math.nan if value is None else float(value)
        if "pred_mmse" in row:
            row["mmse_abs_error"] = abs(row["pred_mmse"] - row["mmse"])
        if "pred_cdr_stage" in row:
            row["cdr_correct"] = math.nan if math.isnan(row["cdr"]) else float(row["pred_cdr_stage"] == row["cdr"])
        return row | self.metrics


def clinical_columns(records: list[CaseRecord], schema: ClinicalSchema) -> dict[str, Any]:
    """The ``clin_*`` columns that :meth:`ClinicalSchema.encode` reads, built from raw record values.

    A clinical variable the checkpoint never saw is ignored; one it expects but a record lacks is
    missing (normal in clinical data). A numeric variable holding text is an :class:`InputError`.
    """
    columns: dict[str, Any] = {}
    for feature in schema.numeric:
        values = []
        for record in records:
            raw = record.clinical.get(feature.name)
            try:
                values.append(math.nan if raw is None else float(raw))
            except (TypeError, ValueError):
                raise InputError(record.images[0], f"clinical {feature.name}={raw!r} is not a number") from None
        columns[CLINICAL_PREFIX + feature.name] = np.asarray(values, np.float64)
    for feature in schema.categorical:
        values = [record.clinical.get(feature.name) for record in records]
        columns[CLINICAL_PREFIX + feature.name] = [None if v is None else str(v) for v in values]
    return columns


def mirror_sets(config: Config) -> list[tuple[int, ...]]:
    """Tensor dims (of a (B, C, X, Y, Z) batch) to flip for test-time mirroring: every non-empty subset
    of the axes that training mirrored (``train.augment.flip_axes``), none if it never mirrored."""
    augment = config.train.augment
    if not (augment.enabled and augment.flip_prob > 0):
        return []
    dims = [2 + axis for axis in sorted(set(augment.flip_axes))]
    return [combo for k in range(1, len(dims) + 1) for combo in itertools.combinations(dims, k)]


def mirrored_probabilities(model, logits: torch.Tensor, image: torch.Tensor, clinical, cross: float,
                           voxel_volume: torch.Tensor, mirrors: list[tuple[int, ...]]) -> torch.Tensor:
    """Class probabilities (B, K, X, Y, Z) summed over ``image`` (whose ``logits`` are given) and its
    mirror images, each mapped back; the sum, not the mean, since only its argmax is used. Over a
    full set of mirrors the result is exactly equivariant: mirroring the input mirrors the output."""
    probabilities = logits.float().softmax(1)
    for dims in mirrors:
        mirrored = model(image.flip(dims), clinical, cross, voxel_volume).seg[0]
        probabilities = probabilities + mirrored.float().softmax(1).flip(dims)
    return probabilities


class Predictor:
    """A checkpoint ready to predict. ``device`` defaults to CUDA when available.

    ``tta``: test-time mirroring, as nnU-Net does — the class probabilities are combined over the
    image and its mirror images along the axes training mirrored (one extra pass for the default
    left-right flip). It costs a forward pass per mirror image and gains a few thousandths of Dice.
    Outcome predictions come from the unmirrored pass.
    """

    def __init__(self, checkpoint: str | Path, device: str | torch.device | None = None, tta: bool = True):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        loaded = read_checkpoint(checkpoint, map_location=self.device)
        self.checkpoint = Path(checkpoint)
        self.config, self.spec, self.schema = loaded.config, loaded.spec, loaded.schema
        self.model = to_layout(build_model(self.config.model, self.spec.channels, self.schema).to(self.device),
                               self.config.train.channels_last)
        self.model.load_state_dict(loaded.state["model"])
        self.model.eval()
        # The cross-task strength the checkpoint was validated with (the curriculum's at its epoch).
        self.cross = float(loaded.metrics.get(
            "cross", Curriculum(self.config.train.curriculum, lr=self.config.train.lr).at(1.0).cross))
        self.structures = {k: v for k, v in self.config.data.label_names.items() if k != 0}
        self.autocast, _ = autocast_for(self.config.train.precision, self.device)
        self.mirrors = mirror_sets(self.config) if tta else []

    def predict(self, record: CaseRecord) -> CasePrediction | Quarantined:
        return self.predict_batch([record])[0]

    def predict_batch(self, records: list[CaseRecord]) -> list[CasePrediction | Quarantined]:
        """Validate, preprocess and predict ``records`` in one forward pass; a case that fails
        validation or preprocessing comes back as a :class:`Quarantined` in its place."""
        results: list[CasePrediction | Quarantined | None] = [None] * len(records)
        ready: list[tuple[int, Any, Any]] = []  # (index, loaded case, prepared case)
        for i, record in enumerate(records):
            try:
                case = load_case(record, set(self.config.data.label_names), self.config.data.max_voxels,
                                 self.spec.channels)
                clinical_columns([record], self.schema)  # refuse bad clinical values per case
            except InputError as exc:
                results[i] = Quarantined(record.subject_id, exc.path, exc.reason, "validate")
                continue
            try:
                prepared = preprocess_case(case.image, None, case.affine, self.spec)
            except Exception as exc:  # one case that breaks preprocessing must not fail the others
                results[i] = Quarantined(record.subject_id, record.images[0],
                                         f"preprocessing failed ({type(exc).__name__}: {exc})", "preprocess")
                continue
            ready.append((i, case, prepared))
        if ready:
            for (i, case, prepared), prediction in zip(ready, self._forward([r for _, _, r in ready],
                                                                            [records[i] for i, _, _ in ready])):
                results[i] = self._finish(records[i], case, prepared.geometry, *prediction)
        return results  # type: ignore[return-value]

    @torch.no_grad()
    def _forward(self, prepared: list, records: list[CaseRecord]) -> list[tuple[np.ndarray | None, dict[str, float]]]:
        """(mask on the prepared grid, outcome predictions) per case."""
        image = image_in_layout(torch.from_numpy(np.stack([p.image for p in prepared])).to(self.device),
                                self.config.train.channels_last)
        clinical = self.schema.encode(clinical_columns(records, self.schema), len(records)).to(self.device)
        voxel_volume = torch.tensor([abs(np.linalg.det(p.geometry.affine[:3, :3])) for p in prepared],
                                    dtype=torch.float32, device=self.device)
        with self.autocast():
            out = self.model(image, clinical, self.cross, voxel_volume)
            masks = None
            if out.seg is not None:
                probabilities = mirrored_probabilities(self.model, out.seg[0], image, clinical, self.cross,
                                                       voxel_volume, self.mirrors)
                masks = probabilities.argmax(1).to(torch.uint8).cpu().numpy()
        outcomes: list[dict[str, float]] = [{} for _ in prepared]
        for name in ("mmse", "risk"):
            if name in out.outcomes:
                for o, value in zip(outcomes, out.outcomes[name].float().cpu().tolist()):
                    o[f"pred_{name}"] = value
        if "cdr" in out.outcomes:
            classes = (out.outcomes["cdr"].float() > 0).sum(-1).cpu()  # CORAL: count the exceeded thresholds
            for o, c, stage in zip(outcomes, classes.tolist(), class_to_cdr(classes).tolist()):
                o["pred_cdr"], o["pred_cdr_stage"] = float(c), stage
        return [(None if masks is None else masks[k], outcomes[k]) for k in range(len(prepared))]

    def _finish(self, record: CaseRecord, case, geometry: Geometry, mask: np.ndarray | None,
                outcomes: dict[str, float]) -> CasePrediction:
        prediction = CasePrediction(record=record, mask=None, affine=geometry.original_affine, outcomes=outcomes)
        if mask is None:
            return prediction
        prediction.mask = restore_to_original(mask, geometry, mode="nearest")
        voxel_mm3 = float(np.prod(geometry.original_spacing))
        counts = np.bincount(prediction.mask.ravel(), minlength=max(self.structures) + 1)
        prediction.volumes_mm3 = {name: float(counts[k]) * voxel_mm3 for k, name in self.structures.items()}
        if case.label is not None:
            seg = segmentation_metrics(torch.from_numpy(prediction.mask[None]), torch.from_numpy(case.label[None]),
                                       self.structures, geometry.original_spacing)
            prediction.metrics = {k: float(v[0]) for k, v in seg.items() if k.split("/")[0] in ("dice", "hd95")}
            ref = np.bincount(case.label.ravel(), minlength=max(self.structures) + 1)
            prediction.metrics |= {f"volume_ref/{name}": float(ref[k]) * voxel_mm3 for k, name in self.structures.items()}
        return prediction
