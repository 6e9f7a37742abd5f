"""Batch inference and evaluation on Ray Data: a checkpoint over a folder, a manifest or an MSD dataset.

Cases stream through a pool of Ray Data actors (``map_batches`` with an ``ActorPoolStrategy``), each
holding one :class:`~jointray.inference.predictor.Predictor` — the model is loaded once per actor,
not once per case. Each actor writes the predicted masks itself, in the input's own space, to
``<out>/masks/<input file name>``; only small per-case rows travel back to the driver, which writes
``<out>/cases.csv`` and ``<out>/summary.json``. Inputs that fail validation are reported there,
never fatal. ``out`` must be writable from every node (a shared filesystem on a cluster).

``summary.json``'s metrics (:func:`summarize_cases`) are taken over the rows that have each input,
so labelled and unlabelled cases mix: segmentation scores and volume agreement over labelled cases,
mean volumes over all, outcome scores over cases with a target.
"""

from __future__ import annotations

import base64
import io
import json
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import ray
import ray.data
import torch

from jointray.artifacts import load_models, read_config
from jointray.config import ConfigError, DataConfig
from jointray.data.records import CaseRecord, Quarantined
from jointray.data.sources import scan_path
from jointray.inference.answers import mask_image
from jointray.inference.predictor import CasePrediction, Predictor
from jointray.metrics.calibration import bins_calibration_error
from jointray.metrics.cohort import validation_metrics, volume_agreement
from jointray.metrics.risk_groups import risk_groups
from jointray.metrics.trust import trust_metrics
from jointray.models import MC_MODES
from jointray.storage import is_uri, redact

MASKS_DIR = "masks"
CASES_FILE = "cases.csv"
SUMMARY_FILE = "summary.json"


@dataclass
class EvaluationReport:
    checkpoint: str
    data: str
    inputs: int
    predicted: int
    quarantined: list[Quarantined]
    metrics: dict[str, float] = field(default_factory=dict)
    out: str = ""
    tta: bool = True
    mc_samples: int = 1
    mc_mode: str = "heads"
    interval: float = 0.9  # central probability of the per-case intervals
    # region ("all", "foreground", "predicted") → summed voxel reliability bins (jointray.metrics.calibration)
    reliability: dict[str, list[list[float]]] = field(default_factory=dict)
    elapsed_s: float = 0.0
    calibrated: bool = False  # the model carried a calibration (jointray calibrate)
    # with collect_voxels: per labelled case, its voxel sample (probabilities (N, K), labels (N,)); not written
    voxels: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)
    rows: list[dict[str, Any]] = field(default_factory=list, repr=False)  # the per-case rows of cases.csv

    def to_json(self) -> str:
        finite = {k: (v if math.isfinite(v) else None) for k, v in self.metrics.items()}
        kept = {k: v for k, v in asdict(self).items() if k not in ("voxels", "rows")}
        return json.dumps(kept | {"metrics": finite}, indent=2) + "\n"


def mask_names(records: list[CaseRecord]) -> list[str]:
    """``<input file name>`` per case (NIfTI inputs keep theirs; DICOM series become ``<subject>.nii.gz``);
    names that would collide (same file name in two folders) are prefixed with the subject ID."""
    names = []
    for record in records:
        image = Path(record.images[0])
        names.append(image.name if image.name.endswith((".nii", ".nii.gz")) else f"{record.subject_id}.nii.gz")
    counts = Counter(names)
    return [n if counts[n] == 1 else f"{r.subject_id}__{n}" for r, n in zip(records, names)]


def write_mask(prediction: CasePrediction, path: Path) -> None:
    """The mask as NIfTI on the input image's grid (its affine), uint8, ready for ITK-SNAP or 3D Slicer."""
    nib.save(mask_image(prediction.mask, prediction.affine), path)


class PredictorActor:
    """One Ray Data actor: a Predictor loaded once, applied to batches of serialised records."""

    def __init__(self, checkpoint: list[str], masks_dir: str, threads: int, tta: bool, mc_samples: int, mc_mode: str,
                 collect_voxels: int = 0):
        torch.set_num_threads(threads)
        inference = read_config(checkpoint[0]).inference.model_copy(update={"mirror": tta})
        self.predictor = Predictor(checkpoint, inference=inference)
        self.predictor.collect_voxels = collect_voxels
        self.masks_dir = Path(masks_dir)
        self.mc_samples, self.mc_mode = mc_samples, mc_mode

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        records = [CaseRecord.from_json(text) for text in batch["record"]]
        rows = []
        predictions = self.predictor.predict_batch(records, self.mc_samples, self.mc_mode)
        for result, name in zip(predictions, batch["mask_name"]):
            if isinstance(result, Quarantined):
                rows.append(json.dumps({"quarantined": asdict(result)}))
                continue
            row = result.row()
            if result.mask is not None:
                write_mask(result, self.masks_dir / str(name))
                row["mask"] = str(self.masks_dir / str(name))
                flagged, reasons = self.predictor.review(result)
                row |= {"needs_review": flagged, "review_reasons": "; ".join(reasons)}
            reliability = {region: bins.tolist() for region, bins in result.reliability.items()}
            payload = {"case": row, "reliability": reliability}
            if result.voxels is not None:
                payload["voxels"] = [_encode(array) for array in result.voxels]
            rows.append(json.dumps(payload))
        return {"result": np.array(rows, dtype=object)}


def _encode(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _decode(text: str) -> np.ndarray:
    return np.load(io.BytesIO(base64.b64decode(text)), allow_pickle=False)


def summarize_cases(rows: list[dict[str, Any]], structures: dict[int, str], cdr_classes: int,
                    failure_dice: float = 0.8) -> dict[str, float]:
    """The cohort metrics of ``summary.json`` from per-case rows (:meth:`CasePrediction.row`).

    Each labelled row first gets ``missed/<name>``: 1 where the predicted volume is 0 and the reference's
    is not (the prediction has no voxel of a structure the reference has), else 0.

    Args:
        rows: per-case rows; labelled and unlabelled ones may come in any order.
        structures: label → name.
        cdr_classes: K of the model's CDR head.
        failure_dice: a case whose worst structure scores below it failed (the review flag's figures).

    Returns:
        :func:`~jointray.metrics.cohort.validation_metrics` without its ``val/`` prefix (``cases``; per
        structure ``dice/``, ``hd95/`` in mm with a miss at its worst case, and ``missed/`` counts;
        outcome scores), ``mean_volume/<name>_mm3`` over every row, ``mean_volume_ref/<name>_mm3`` over
        the labelled ones, :func:`~jointray.metrics.cohort.volume_agreement` (ICC, Bland–Altman,
        volume errors), :func:`~jointray.metrics.trust.trust_metrics` (uncertainty against error, the
        review flag, MMSE interval coverage, CDR calibration) and, with a risk head, the log-rank test
        of the predicted-risk tertiles (``risk_logrank_statistic``, ``risk_logrank_p``;
        :mod:`jointray.metrics.risk_groups`).
    """
    for row in rows:
        for name in structures.values():
            if f"volume_ref/{name}" in row:
                row[f"missed/{name}"] = float(row[f"volume/{name}"] == 0 and row[f"volume_ref/{name}"] > 0)
    metrics = {k.removeprefix("val/"): v for k, v in validation_metrics(rows, structures, cdr_classes).items()}
    for prefix in ("volume/", "volume_ref/"):
        for name in structures.values():
            values = [r[prefix + name] for r in rows if prefix + name in r]
            if values:
                metrics[f"mean_{prefix}{name}_mm3"] = float(np.mean(values))
    metrics |= volume_agreement(rows, structures) | trust_metrics(rows, structures, cdr_classes, failure_dice)
    if any("pred_risk" in r for r in rows):
        columns = [[r.get(k, math.nan) for r in rows] for k in ("pred_risk", "time", "event")]
        groups = risk_groups(*columns)
        metrics |= {"risk_logrank_statistic": groups.statistic, "risk_logrank_p": groups.p}
    return metrics


def _pool_size(requested: int | None, n_cases: int) -> int:
    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(1, min(requested or cpus, cpus, n_cases))


def evaluate(checkpoint: str | Path | list[str | Path], data: str | Path, out: str | Path,
             labels: str | Path | None = None, workers: int | None = None, batch_size: int = 2,
             tta: bool | None = None, mc_samples: int | None = None, mc_mode: str | None = None,
             collect_voxels: int = 0) -> EvaluationReport:
    """Run ``checkpoint`` (a model, an ensemble, or a list of them to average) over ``data`` (needs a Ray
    instance; ``ray.init`` done by the caller); ``tta``: test-time mirroring (see
    :class:`~jointray.inference.predictor.Predictor`); ``mc_samples`` > 1: Monte Carlo samples per case
    (``mc_mode`` as in :data:`jointray.models.MC_MODES`, default the config's), for the per-case intervals
    and the uncertainty figures. A calibrated model (``jointray calibrate``) defaults to the settings it was
    calibrated under, others to mirroring and one pass. ``collect_voxels``: each labelled case hands back a
    sample of that many voxels (:func:`~jointray.inference.predictor.calibration_voxels`), for fitting."""
    started = time.perf_counter()
    sources = [str(c) if is_uri(c) else str(Path(c).resolve())
               for c in (checkpoint if isinstance(checkpoint, (list, tuple)) else [checkpoint])]
    loaded = load_models(sources)  # a missing or corrupt model fails here, before any actor starts
    members, calibration = loaded.members, loaded.calibration
    cfg = members[0].config
    defaults = calibration.settings if calibration is not None else None
    tta = (defaults.mirror if defaults else True) if tta is None else tta
    mc_samples = (defaults.mc_samples if defaults else 1) if mc_samples is None else mc_samples
    modes = MC_MODES if all(m.runtime == "torch" for m in members) else ("full",)  # a graph samples all or nothing
    mc_mode = mc_mode or (defaults.mc_mode if defaults else None) or (
        cfg.inference.mc_mode if cfg.inference.mc_mode in modes else modes[0])
    if mc_samples < 1 or mc_samples > cfg.inference.max_mc_samples or mc_mode not in modes:
        raise ConfigError(f"mc_samples={mc_samples} must be from 1 to inference.max_mc_samples="
                          f"{cfg.inference.max_mc_samples} and mc_mode={mc_mode!r} one of {list(modes)}")
    data_cfg: DataConfig = cfg.data
    scan = scan_path(Path(data), data_cfg, None if labels is None else Path(labels))
    if not scan.records and not scan.rejected:
        raise ConfigError(f"no cases found in {data}")
    out = Path(out)
    masks_dir = out / MASKS_DIR
    masks_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    reliability: dict[str, np.ndarray] = {}
    voxels: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    quarantined = list(scan.rejected)
    if scan.records:
        pool = _pool_size(workers, len(scan.records))
        gpus = ray.cluster_resources().get("GPU", 0.0)
        cpus = ray.cluster_resources().get("CPU", 1.0)
        items = [{"record": r.to_json(), "mask_name": n} for r, n in zip(scan.records, mask_names(scan.records))]
        ds = ray.data.from_items(items, override_num_blocks=min(len(items), 4 * pool))
        results = ds.map_batches(
            PredictorActor,
            fn_constructor_kwargs={"checkpoint": sources, "masks_dir": str(masks_dir.resolve()),
                                   "threads": max(1, int(cpus // pool)), "tta": tta, "mc_samples": mc_samples,
                                   "mc_mode": mc_mode, "collect_voxels": collect_voxels},
            batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(size=pool),
            num_cpus=1,
            num_gpus=1 if gpus >= pool else 0,
        )
        for text in results.to_pandas()["result"]:
            payload = json.loads(text)
            if "quarantined" in payload:
                quarantined.append(Quarantined(**payload["quarantined"]))
            else:
                rows.append(payload["case"])
                if "voxels" in payload:
                    voxels[payload["case"]["subject_id"]] = tuple(_decode(text) for text in payload["voxels"])
                for region, bins in payload["reliability"].items():
                    reliability[region] = reliability.get(region, 0) + np.asarray(bins)
    rows.sort(key=lambda r: r["subject_id"])
    quarantined.sort(key=lambda q: (q.stage, q.path))
    structures = {k: v for k, v in data_cfg.label_names.items() if k != 0}
    failure_dice = calibration.failure_dice if calibration is not None else 0.8
    metrics = summarize_cases(rows, structures, cfg.model.cdr_classes, failure_dice) if rows else {}
    metrics |= {f"voxel_ece/{region}": bins_calibration_error(bins) for region, bins in reliability.items()}
    pd.DataFrame(rows).to_csv(out / CASES_FILE, index=False)
    report = EvaluationReport(checkpoint=", ".join(map(redact, sources)), data=str(data),
                              inputs=len(scan.records) + len(scan.rejected),
                              predicted=len(rows), quarantined=quarantined, metrics=metrics, out=str(out), tta=tta,
                              mc_samples=mc_samples, mc_mode=mc_mode, interval=cfg.inference.interval,
                              reliability={region: bins.tolist() for region, bins in reliability.items()},
                              elapsed_s=round(time.perf_counter() - started, 2), calibrated=calibration is not None,
                              voxels=voxels, rows=rows)
    (out / SUMMARY_FILE).write_text(report.to_json())
    return report
