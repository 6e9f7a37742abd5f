"""A semi-synthetic cohort: real labelled images with a simulated, deterministic clinical outcome model.

Real images carry no outcomes, and the synthetic cohort's images are not real. This module attaches a
known outcome model to any MSD-style labelled dataset, driven by each case's label-derived
hippocampal volume, so that joint-learning claims (does the image help predict MMSE, CDR and
conversion?) can be tested on real anatomy with an oracle to compare against.

Layout written by :func:`semisynthetic_manifest`::

    out/manifest.csv   subject_id, image, label (absolute paths into the source folder), age, sex,
                       education_years, apoe4, mmse, cdr, time, event — the synthetic cohort's columns
    out/truth.csv      kept out of the manifest (a model must not see it): subject_id,
                       volume_<name>_mm3 per label, volume_total_mm3, volume_z, lp_mmse, lp_hazard
    out/cohort.json    seed, noise, coefficients, source folder, volume reference, cases, skipped

Volumes: V = (voxels with that label) · |det(affine[:3, :3])| mm³; V_total sums the non-background
labels. z = (V_total − m)/s with m, s the mean and SD over every readable case the listing holds,
``exclude``d ones included, so excluding cases changes nobody else's values.

Per subject, all draws from ``np.random.default_rng([seed, crc32(subject_id)])`` in a fixed order,
so a subject's values depend only on (seed, its id, its volume, m, s)::

    age ~ N(72, 7²) clipped to [55, 90];  sex ~ Bernoulli(0.55) (F);  education ~ round N(14, 3²) in [6, 22]
    apoe4 ∈ {0, 1, 2} with probabilities (0.62, 0.30, 0.08);  a = (age − 72)/7,  e = (education − 14)/3

Outcomes (ε, δ ~ N(0, 1); defaults of :class:`OutcomeNoise`: mmse_sd 1.9, cdr_sd 0.6)::

    lp_mmse = 2.0·z − 0.8·a + 0.5·e − 1.0·apoe4
    mmse    = clip(25 + lp_mmse + mmse_sd·ε, 0, 30), one decimal
    cdr     = 0 | 0.5 | 1 | 2  as  −lp_mmse/2.3 + cdr_sd·δ  crosses −0.1, 1.0, 1.9   (≈ 40/35/18/7 %)
    lp_hazard = −0.8·z + 0.3·a + 0.5·apoe4
    T = 6·(E·exp(−lp_hazard))^(1/1.5),  E ~ Exp(1)              (Weibull PH, years)
    C ~ U(2, 8) years of follow-up;  time = min(T, C),  event = [T ≤ C]     (≈ 50–64 % events)

Variance of lp_mmse: 4.0 from volume, ≈ 1.3 from covariates, against 3.6 of noise: the volume carries
most of what can be predicted, the covariates add a little (``tests/test_semisynthetic.py`` holds the
fits on the MSD cases to ranges). Education and apoe4 are missing (empty cells) at ``missing_rate`` each; the
outcomes use the true values. Cases the source refuses or whose label cannot be read are skipped with
a reason, never a crash.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from jointray.data.records import Quarantined
from jointray.data.sources import scan_msd
from jointray.data.synthetic import CLINICAL_COLUMNS, MANIFEST_COLUMNS

__all__ = ["CLINICAL_COLUMNS", "COEFFICIENTS", "OutcomeNoise", "SemisyntheticCohort", "oracle_features",
           "semisynthetic_manifest"]

#: Bump whenever the output for given inputs changes.
GENERATOR_VERSION = 1
#: The outcome model's fixed coefficients (see the module docstring); written to cohort.json.
COEFFICIENTS = {
    "mmse": {"intercept": 25.0, "volume_z": 2.0, "age": -0.8, "education": 0.5, "apoe4": -1.0},
    "cdr": {"scale": 2.3, "cutpoints": [-0.1, 1.0, 1.9]},
    "hazard": {"volume_z": -0.8, "age": 0.3, "apoe4": 0.5, "weibull_scale": 6.0, "weibull_shape": 1.5,
               "follow_up": [2.0, 8.0]},
}
_CDR_STAGES = (0.0, 0.5, 1.0, 2.0)


@dataclass(frozen=True)
class OutcomeNoise:
    """Noise of the outcome model: SD of the MMSE noise (points), of the CDR severity noise (units of
    −lp_mmse/2.3), and the rate at which education_years and apoe4 are left empty."""

    mmse_sd: float = 1.9
    cdr_sd: float = 0.6
    missing_rate: float = 0.05

    def __post_init__(self) -> None:
        if self.mmse_sd < 0 or self.cdr_sd < 0 or not 0 <= self.missing_rate < 1:
            raise ValueError(f"OutcomeNoise: SDs must be ≥ 0 and missing_rate in [0, 1), got {self}")


@dataclass
class SemisyntheticCohort:
    """What :func:`semisynthetic_manifest` wrote; ``skipped``: cases left out, each with its reason."""

    manifest: Path
    truth: Path
    cohort: Path
    n_cases: int
    skipped: list[Quarantined] = field(default_factory=list)


def _volumes(path: str, label_names: dict[int, str]) -> dict[str, float] | str:
    """Structure volumes in mm³ from a label file, or the reason it cannot be used."""
    try:
        image = nib.load(path)
        labels = np.asarray(image.dataobj)
    except Exception as exc:  # noqa: BLE001 — any unreadable file is one skipped case, not a failed cohort
        return f"label cannot be read: {type(exc).__name__}: {exc}"
    if labels.ndim != 3:
        return f"label has shape {labels.shape}, expected 3-D"
    values = np.unique(labels)
    unknown = sorted(set(values.tolist()) - set(label_names))
    if unknown:
        return f"label holds values {unknown[:5]} outside label_names {sorted(label_names)}"
    voxel_mm3 = abs(float(np.linalg.det(image.affine[:3, :3])))
    counts = {k: int(np.count_nonzero(labels == k)) for k in label_names if k != 0}
    if sum(counts.values()) == 0:
        return "label has no foreground voxels"
    volumes = {f"volume_{label_names[k]}_mm3": round(n * voxel_mm3, 3) for k, n in counts.items()}
    volumes["volume_total_mm3"] = round(sum(counts.values()) * voxel_mm3, 3)
    return volumes


def _draw(subject_id: str, seed: int, z: float, noise: OutcomeNoise) -> tuple[dict, dict]:
    """One subject's manifest values and linear predictors; every draw is made whatever its use."""
    rng = np.random.default_rng([seed, zlib.crc32(subject_id.encode())])
    age = float(np.clip(rng.normal(72.0, 7.0), 55.0, 90.0))
    sex = "F" if rng.random() < 0.55 else "M"
    education = int(np.clip(np.round(rng.normal(14.0, 3.0)), 6, 22))
    apoe4 = int(rng.choice(3, p=[0.62, 0.30, 0.08]))
    eps, delta, e_exp, follow_up, miss_edu, miss_apoe = (
        rng.normal(), rng.normal(), rng.exponential(), rng.uniform(*COEFFICIENTS["hazard"]["follow_up"]),
        rng.random(), rng.random(),
    )
    a, e = (age - 72.0) / 7.0, (education - 14.0) / 3.0
    m, h, c = COEFFICIENTS["mmse"], COEFFICIENTS["hazard"], COEFFICIENTS["cdr"]
    lp_mmse = m["volume_z"] * z + m["age"] * a + m["education"] * e + m["apoe4"] * apoe4
    lp_hazard = h["volume_z"] * z + h["age"] * a + h["apoe4"] * apoe4
    severity = -lp_mmse / c["scale"] + noise.cdr_sd * delta
    # Weibull proportional hazards by inverse transform: S(t) = exp(−(t/λ)^k · e^lp_hazard).
    t_event = h["weibull_scale"] * (e_exp * np.exp(-lp_hazard)) ** (1.0 / h["weibull_shape"])
    row = {
        "age": round(age, 1), "sex": sex,
        "education_years": None if miss_edu < noise.missing_rate else education,
        "apoe4": None if miss_apoe < noise.missing_rate else apoe4,
        "mmse": round(float(np.clip(m["intercept"] + lp_mmse + noise.mmse_sd * eps, 0.0, 30.0)), 1),
        "cdr": _CDR_STAGES[int(np.searchsorted(c["cutpoints"], severity))],
        "time": max(round(float(min(t_event, follow_up)), 2), 0.01),
        "event": int(t_event <= follow_up),
    }
    return row, {"volume_z": round(z, 6), "lp_mmse": round(lp_mmse, 6), "lp_hazard": round(lp_hazard, 6)}


def semisynthetic_manifest(
    msd_root: Path,
    out: Path,
    seed: int = 0,
    noise: OutcomeNoise | None = None,
    label_names: dict[int, str] | None = None,
    exclude: Iterable[str] = (),
) -> SemisyntheticCohort:
    """Write a manifest with simulated covariates and outcomes for the labelled cases of an MSD folder.

    Args:
        msd_root: MSD folder (``dataset.json`` 'training' pairs image and label files).
        out: folder to write ``manifest.csv``, ``truth.csv`` and ``cohort.json`` into (created if needed).
        seed: cohort seed; a subject's values depend on ``(seed, subject_id)`` and its volume only.
        noise: outcome noise, :class:`OutcomeNoise` defaults if None.
        label_names: label value → structure name, as in ``data.label_names`` (default background,
            anterior, posterior); names the truth.csv volume columns.
        exclude: subject ids to leave out (they still count in the volume reference m, s).

    Returns:
        A :class:`SemisyntheticCohort`; configure the manifest with ``data.format: manifest`` and
        ``data.clinical_columns`` = :data:`CLINICAL_COLUMNS`.

    Raises:
        ConfigError: ``msd_root`` is not an MSD folder (from :func:`~jointray.data.sources.scan_msd`).
        ValueError: ``exclude`` names a subject the folder does not hold, or fewer than two labels can be read.
    """
    noise = noise or OutcomeNoise()
    label_names = label_names or {0: "background", 1: "anterior", 2: "posterior"}
    root, out = Path(msd_root).resolve(), Path(out)
    scan = scan_msd(root, label_names)
    excluded = set(exclude)
    unknown = sorted(excluded - {r.subject_id for r in scan.records} - {q.subject_id for q in scan.rejected})
    if unknown:
        raise ValueError(f"exclude names subjects {unknown} that {root} does not hold")
    skipped = [q for q in scan.rejected if q.subject_id not in excluded]
    readable = []
    for record in scan.records:
        volumes = _volumes(record.label, label_names)
        if isinstance(volumes, str):
            if record.subject_id not in excluded:
                skipped.append(Quarantined(record.subject_id, record.label, volumes, "validate"))
            continue
        readable.append((record, volumes))
    totals = np.array([v["volume_total_mm3"] for _, v in readable])
    if len(totals) < 2 or totals.std() == 0:
        raise ValueError(f"{root}: need at least two readable labels of different volume, found {len(totals)}")
    mean, sd = float(totals.mean()), float(totals.std())

    rows, truth = [], []
    for record, volumes in readable:
        if record.subject_id in excluded:
            continue
        values, predictors = _draw(record.subject_id, seed, (volumes["volume_total_mm3"] - mean) / sd, noise)
        # Absolute paths: the manifest reads the same bytes wherever it is written, and the data stays put.
        rows.append({"subject_id": record.subject_id, "image": record.images[0], "label": record.label, **values})
        truth.append({"subject_id": record.subject_id, **volumes, **predictors})

    out.mkdir(parents=True, exist_ok=True)
    # Removed first and written last, so an interrupted run never looks like a finished cohort.
    (out / "cohort.json").unlink(missing_ok=True)
    manifest = pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))
    for column in ("education_years", "apoe4"):  # "1", not "1.0"; missing values as empty cells
        manifest[column] = manifest[column].astype("Int64")
    manifest.to_csv(out / "manifest.csv", index=False)
    pd.DataFrame(truth).to_csv(out / "truth.csv", index=False)
    meta = json.loads((root / "dataset.json").read_text())
    info = {
        "generator": "jointray.data.semisynthetic", "generator_version": GENERATOR_VERSION, "seed": int(seed),
        "noise": asdict(noise), "coefficients": COEFFICIENTS,
        # The source's attribution travels with every figure computed from it.
        "source": {"folder": str(root), **{k: meta[k] for k in ("name", "reference", "licence") if k in meta}},
        "volume_reference_mm3": {"mean": round(mean, 3), "sd": round(sd, 3), "n": len(totals)},
        "n_cases": len(rows), "excluded": sorted(excluded),
        "skipped": [{"subject_id": q.subject_id, "path": q.path, "reason": q.reason} for q in skipped],
    }
    (out / "cohort.json").write_text(json.dumps(info, indent=2) + "\n")
    return SemisyntheticCohort(out / "manifest.csv", out / "truth.csv", out / "cohort.json", len(rows), skipped)


def oracle_features(truth_csv: Path, manifest_csv: Path) -> pd.DataFrame:
    """The oracle baseline's table: subject_id, the true volume_total_mm3, the covariates (missing as NaN)
    and the targets, one row per manifest subject."""
    truth = pd.read_csv(truth_csv, dtype={"subject_id": str})[["subject_id", "volume_total_mm3"]]
    manifest = pd.read_csv(manifest_csv, dtype={"subject_id": str}).drop(columns=["image", "label"])
    return truth.merge(manifest, on="subject_id", how="inner", validate="one_to_one")
