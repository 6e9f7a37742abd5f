"""What a prediction looks like to a client: the JSON answer, the mask as NIfTI, the arrays the web viewer draws."""

from __future__ import annotations

import base64
import gzip
import io
import math
import zipfile
from typing import Any

import nibabel as nib
import numpy as np

from jointray.inference.cases import PreparedCase
from jointray.inference.predictor import CasePrediction, Estimate, Predictor

#: The viewer gets at most this many voxels along an axis (every n-th voxel beyond it).
VIEWER_MAX_AXIS = 192


def mask_image(mask: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    """A label mask as uint8 NIfTI on the input's grid (its affine), ready for ITK-SNAP or 3D Slicer."""
    image = nib.Nifti1Image(mask.astype(np.uint8), affine)
    image.set_data_dtype(np.uint8)
    image.header.set_xyzt_units("mm")
    return image


def nifti_gz(image: nib.Nifti1Image) -> bytes:
    return gzip.compress(image.to_bytes(), compresslevel=6)


def mask_files(prediction: CasePrediction, uncertainty: bool) -> tuple[bytes, str, str]:
    """(body, media type, file name): the mask as ``.nii.gz``, or with ``uncertainty`` a zip of the mask and the
    voxel entropy map (nats, float32)."""
    mask = nifti_gz(mask_image(prediction.mask, prediction.affine))
    stem = prediction.name.removesuffix(".gz").removesuffix(".nii").removesuffix(".zip")
    if not uncertainty:
        return mask, "application/gzip", f"{stem}_mask.nii.gz"
    entropy = nib.Nifti1Image(prediction.entropy.astype(np.float32), prediction.affine)
    entropy.header.set_xyzt_units("mm")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr(f"{stem}_mask.nii.gz", mask)
        archive.writestr(f"{stem}_entropy.nii.gz", nifti_gz(entropy))
    return buffer.getvalue(), "application/zip", f"{stem}_prediction.zip"


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _bounds(e: Estimate) -> list[float | None]:
    return [_finite(v) for v in e.interval]  # ±inf (too few calibration cases for the level) is null in JSON


def _estimate(e: Estimate) -> dict[str, Any]:
    return {"point": e.point, "mean": e.mean, "std": e.std, "interval": _bounds(e), "interval_method": e.method}


#: What an uncalibrated model's intervals and flag are, said where they are shown.
UNCALIBRATED = ("This model is not calibrated (`jointray calibrate`): its intervals are Monte Carlo quantiles and "
                "its review flag fixed limits; neither has a coverage or miss-rate guarantee.")


def trust_summary(predictor: Predictor, prediction: CasePrediction) -> dict[str, Any]:
    """What the answer's figures promise: the calibration's sentences, or that there is none."""
    calibration = predictor.calibration
    if calibration is None:
        return {"calibrated": False, "statement": UNCALIBRATED}
    methods = {e.method for e in [*prediction.volume_estimates.values(),
                                  *(prediction.outcome_estimates.get(n) for n in ("mmse",))] if e is not None}
    summary = {"calibrated": True, "level": predictor.inference.interval, "calibration_cases": calibration.cases,
               "voxel_scaling": calibration.scaling_method, "interval_methods": sorted(methods),
               "statement": calibration.coverage_sentence(predictor.inference.interval),
               "review_statement": calibration.review_sentence(), "ood_statement": calibration.ood_sentence(),
               "ood_p_value": _finite(prediction.ood_p)}
    if "conformal" in methods:
        summary["note"] = (f"Calibrated with {calibration.settings.mc_samples} Monte Carlo samples ({calibration.settings.mc_mode}"
                           f", mirroring {'on' if calibration.settings.mirror else 'off'}); this request ran otherwise, "
                           "so its intervals have one width for every case (still conformal).")
    return summary


def answer(predictor: Predictor, case: PreparedCase, prediction: CasePrediction,
           seconds: dict[str, float]) -> dict[str, Any]:
    """The JSON answer of ``POST /v1/predict`` (see ``jointray/serve/ingress.py`` for the schema in OpenAPI)."""
    needs_review, reasons = predictor.review(prediction)
    structures = {
        name: {"volume_mm3": {"mask": prediction.volumes_mm3[name], "mean": est.mean, "std": est.std,
                              "interval": _bounds(est), "interval_method": est.method},
               "predicted_dice": _finite(prediction.predicted_dice.get(name, math.nan)),
               "uncertainty": {k: _finite(v) for k, v in prediction.uncertainty[name].items()}}
        for name, est in prediction.volume_estimates.items()
    }
    outcomes: dict[str, Any] = {}
    for name, value in prediction.outcome_estimates.items():
        outcomes[name] = value if isinstance(value, dict) else _estimate(value)
    geometry = case.geometry
    return {
        "model": {"name": predictor.config.train.name, "variant": predictor.config.model.variant,
                  "version": predictor.version},
        "input": {"name": case.name, "shape": list(geometry.original_shape),
                  "spacing_mm": [round(s, 6) for s in geometry.original_spacing]},
        "path": prediction.path,
        "mc": {"samples": prediction.mc_samples, "mode": prediction.mc_mode, "interval": predictor.inference.interval},
        "structures": structures,
        "outcomes": outcomes,
        "needs_review": needs_review,
        "review": {"reasons": reasons} | (
            {"predicted_dice_threshold": _finite(predictor.calibration.review_threshold),
             "failure_dice": predictor.calibration.failure_dice, "alpha": predictor.calibration.review_alpha}
            if predictor.calibration is not None else
            {"entropy_threshold": predictor.inference.review_entropy,
             "volume_cv_threshold": predictor.inference.review_volume_cv}),
        "trust": trust_summary(predictor, prediction),
        "timings_s": {k: round(v, 4) for k, v in seconds.items()},
    }


def report_page(predictor: Predictor, case: PreparedCase, prediction: CasePrediction, body: dict[str, Any]) -> str:
    """The per-patient HTML report of ``prediction`` (:mod:`jointray.report.patient`) with its explanations
    (:func:`jointray.inference.explain.explain_case`: activation maps, and the clinical features'
    attributions where the model reads a clinical record); needs the entropy map
    (``finish(..., entropy_map=True)``) for its uncertainty view and the case's display copy of the input."""
    from jointray.inference.explain import explain_case  # captum, matplotlib and jinja2 load only for a report
    from jointray.report.document import to_html
    from jointray.report.patient import patient_document

    # An exported graph has no gradients to explain with: its report goes without the explanations.
    explanation = explain_case(predictor, case) if predictor.runtimes == ["torch"] else None
    document = patient_document(body, case.original[0], case.geometry.original_affine, prediction.mask,
                                prediction.entropy, predictor.metrics, predictor.config.model.num_classes,
                                explanation)
    return to_html(document)


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype=np.uint8).tobytes()).decode("ascii")


def viewer_arrays(case: PreparedCase, prediction: CasePrediction, classes: int,
                  labels: dict[int, str]) -> dict[str, Any]:
    """The input (first channel, 1st–99th percentile → 0–255), the mask and the entropy (0 – ln K → 0–255) on the
    input's grid, subsampled to at most ``VIEWER_MAX_AXIS`` voxels per axis, as base64 C-order uint8 arrays."""
    image = case.original[0]
    step = tuple(max(1, math.ceil(n / VIEWER_MAX_AXIS)) for n in image.shape)
    pick = tuple(slice(None, None, s) for s in step)
    image, mask, entropy = image[pick], prediction.mask[pick], prediction.entropy[pick]
    low, high = np.percentile(image, [1, 99])
    grey = np.clip((image - low) / max(high - low, 1e-6), 0, 1) * 255
    heat = np.clip(entropy / math.log(classes), 0, 1) * 255
    return {"shape": list(image.shape), "step": list(step), "image": _b64(np.round(grey)), "mask": _b64(mask),
            "uncertainty": _b64(np.round(heat)), "labels": {str(k): v for k, v in labels.items()}}
