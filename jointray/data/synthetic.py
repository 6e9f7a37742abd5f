"""A deterministic synthetic cohort: T1-like NIfTI volumes, hippocampus labels and a clinical manifest.

The cohort is written the way a user's own data would arrive (NIfTI files in a non-RAS orientation,
a manifest CSV with relative paths and empty cells for missing values), so that a demo goes through
the real ingestion path: sources → validate → preprocess.

Layout written by :func:`generate_cohort`::

    out_dir/images/sub-XXXX.nii.gz   float32 T1-like volume, shape (X, Y, Z) ≈ ``shape`` ± 4 voxels
    out_dir/labels/sub-XXXX.nii.gz   uint8: 0 background, 1 anterior hippocampus (head),
                                     2 posterior hippocampus (body/tail)
    out_dir/manifest.csv             subject_id, image, label, age, sex, education_years, apoe4,
                                     mmse, cdr, time, event
    out_dir/latent.csv               ground truth kept out of the manifest: subject_id, stage,
                                     volume_anterior_mm3, volume_posterior_mm3, volume_total_mm3
    out_dir/cohort.json              generation parameters (see :func:`cohort_matches`)

Generative model (per subject *i*, all draws from ``np.random.default_rng([seed, i])``, so subject
*i* is the same whatever ``n_subjects`` is):

Covariates::

    age ~ N(72, 7²) clipped to [55, 90];  sex ~ Bernoulli(0.55) (F);  education ~ round N(14, 3²) in [6, 22]
    apoe4 ∈ {0, 1, 2} with probabilities (0.62, 0.30, 0.08)

Latent disease stage s ∈ (0, 1)::

    s₀ ~ Beta(2, 3);   s = σ(logit(s₀) + 0.7·apoe4 + 0.04·(age − 72))          (σ: logistic)

Anatomy: the hippocampus is the set {x : m(x) < f}, where m is the normalised distance to a sweep of
K = 28 ellipsoids along a curved centre line c(t), t ∈ [0, 1] (anterior → posterior; 25·g mm long,
the tail bending up and medially by U(2, 5) mm each), with radii (lateral, superior)::

    r(t) = g·(4.6·(1 − 0.55 t) + 2.2·h(t),  3.4·(1 − 0.5 t) + 1.0·h(t))·(1 + 0.03·n(t))
    h(t) = exp(−((t − 0.12)/0.15)²)

a bulbous head on a tube tapering towards the tail; g ~ LogNormal(0, 0.025²) clipped to [0.92, 1.08]
is the subject's size and n(t) a smooth random profile. Atrophy shrinks the structure::

    f = 1 − 0.18·s          (total volume ≈ V₀·g³·f^2.4 with V₀ ≈ 1250 mm³: about −37 % at s = 1)

Every coordinate first goes through a subject-specific rotation (yaw ±10°, pitch 6–18°, roll ±8°), a
translation (up to 3 mm) and a smooth random displacement field (Gaussian-filtered white noise, 5 mm
correlation, 0.7 mm per axis), which deforms the shape. Label 1 (head) vs 2 (body/tail) is
anatomical: the side of a plane across the long axis at t_split ~ U(0.28, 0.34), not an intensity edge.

Tissue around it, following the same deformation: cerebrospinal fluid (CSF) in the temporal horn over
the superolateral side, m < 1.1 + 0.7·s (the horn enlarges with atrophy), and in the space freed by
atrophy all round, f ≤ m < 1; grey matter (subiculum/parahippocampal gyrus) directly against the
inferomedial side, m < 1.8; the amygdala, grey matter abutting the head anterosuperiorly; white matter
out to m = 2.1; and beyond, folded cortex drawn from a smooth random field φ (grey matter where
φ > 0.45, sulcal CSF where φ > 1.5 − 0.4·s). Grey matter at nearly the hippocampus' intensity fills
about a quarter of the volume, so no intensity threshold or window picks out the hippocampus
(best window Dice ≈ 0.15–0.35); its shape and surroundings do.

Image::

    μ = {WM 1.0, GM 0.64, amygdala 0.65, hippocampus 0.59, CSF 0.2}·(1 + N(0, 0.02²)) per tissue
    I = G · | μ ∗ PSF(0.7 mm) · exp(0.12·b(x)) + ε₁ + i·ε₂ |,   ε ~ N(0, 0.035²),  G ~ U(600, 1000)

with b a smooth unit-variance bias field (Rician noise through the magnitude of a complex signal).

Outcomes::

    mmse  = clip(round(29 − 14·s^1.3 + 0.2·(education − 14) + N(0, 1.5²)), 0, 30)
    cdr   = 0 | 0.5 | 1 | 2  as  z = s + N(0, 0.07²)  crosses 0.35, 0.6, 0.82
    T     = 6.5·(E·exp(−η))^(1/1.4),  E ~ Exp(1),  η = 2.5·(s − 0.4) + 0.5·apoe4     (Weibull PH, years)
    C     ~ U(1, 9) years of follow-up;  time = min(T, C),  event = [T ≤ C]     (≈ 40 % censored)

Missing at random in the manifest: age, education_years and apoe4 (10 % each), sex (3 %); targets are
complete. Volumes are stored as an LPS-style affine ``diag(−sx, −sy, sz)`` (axis codes L, P, S), so
array axis 0 points left (lateral for this left hippocampus), axis 1 posterior, axis 2 superior.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy.ndimage import gaussian_filter

__all__ = ["CLINICAL_COLUMNS", "GENERATOR_VERSION", "MANIFEST_COLUMNS", "cohort_matches", "generate_cohort"]

#: Bump whenever the output for a given (n, seed, shape, spacing) changes, so stale folders are regenerated.
GENERATOR_VERSION = 1
MANIFEST_COLUMNS = (
    "subject_id", "image", "label", "age", "sex", "education_years", "apoe4", "mmse", "cdr", "time", "event",
)
#: The manifest's clinical covariates and their kinds, as ``configs/synthetic.yaml`` declares them in
#: ``data.clinical_columns`` (apoe4 counts risk alleles, so it is a number).
CLINICAL_COLUMNS = {"age": "numeric", "sex": "categorical", "education_years": "numeric", "apoe4": "numeric"}

# Tissue classes of the (noise-free) anatomy; the hippocampus class is split into labels 1/2 separately.
_WM, _GM, _CSF, _AMYGDALA, _HIPPOCAMPUS = range(5)
_TISSUE_MEAN = np.array([1.0, 0.64, 0.2, 0.65, 0.59])

_SHAPE_JITTER = 4  # voxels per axis, each way
_MIN_EXTENT_MM = np.array([30.0, 40.0, 30.0])  # smallest field of view (x, y, z) holding the anatomy with margin
_N_CENTRES = 28  # ellipsoids in the sweep; spaced well under their radii so the surface is smooth
_ATROPHY = 0.18  # f = 1 − 0.18·s
_SHELL = 2.1  # normalised distance out to which the medial temporal anatomy is drawn
_HORN_SIDE = np.array([np.cos(np.radians(50.0)), np.sin(np.radians(50.0))])  # superolateral (x, z)


@dataclass(frozen=True)
class _Subject:
    """Everything drawn for one subject; ``stage`` goes to latent.csv, never to the manifest."""

    age: float
    sex: str
    education: int
    apoe4: int
    stage: float
    mmse: int
    cdr: float
    time: float
    event: int


@dataclass(frozen=True)
class _Hippocampus:
    """A sweep of ellipsoids in the hippocampus' own frame (x lateral, y posterior, z superior; mm)."""

    centres: np.ndarray  # (K, 3)
    radii: np.ndarray  # (K, 3)
    y_split: float  # head (label 1) where the local y is below this
    rotation: np.ndarray  # (3, 3): local = (p − origin) @ rotation
    origin: np.ndarray  # (3,)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + np.exp(-x))


def _draw_subject(rng: np.random.Generator) -> _Subject:
    age = float(np.clip(rng.normal(72.0, 7.0), 55.0, 90.0))
    sex = "F" if rng.random() < 0.55 else "M"
    education = int(np.clip(np.round(rng.normal(14.0, 3.0)), 6, 22))
    apoe4 = int(rng.choice(3, p=[0.62, 0.30, 0.08]))
    s0 = rng.beta(2.0, 3.0)
    stage = float(_sigmoid(np.log(s0 / (1.0 - s0)) + 0.7 * apoe4 + 0.04 * (age - 72.0)))
    mmse = int(np.clip(np.round(29.0 - 14.0 * stage**1.3 + 0.2 * (education - 14) + rng.normal(0.0, 1.5)), 0, 30))
    z = stage + rng.normal(0.0, 0.07)
    cdr = float([0.0, 0.5, 1.0, 2.0][int(np.searchsorted([0.35, 0.6, 0.82], z))])
    # Weibull proportional hazards by inverse transform: S(t) = exp(−(t/6.5)^1.4 · e^η).
    eta = 2.5 * (stage - 0.4) + 0.5 * apoe4
    t_event = 6.5 * (rng.exponential() * np.exp(-eta)) ** (1.0 / 1.4)
    t_censor = rng.uniform(1.0, 9.0)
    return _Subject(
        age=round(age, 1), sex=sex, education=education, apoe4=apoe4, stage=stage, mmse=mmse, cdr=cdr,
        time=max(round(float(min(t_event, t_censor)), 2), 0.01), event=int(t_event <= t_censor),
    )


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Rotation about z (yaw), x (pitch) and y (roll), angles in degrees."""
    a, b, c = np.radians([yaw, pitch, roll])
    rz = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
    rx = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(b), -np.sin(b)], [0.0, np.sin(b), np.cos(b)]])
    ry = np.array([[np.cos(c), 0.0, np.sin(c)], [0.0, 1.0, 0.0], [-np.sin(c), 0.0, np.cos(c)]])
    return rz @ rx @ ry


def _draw_hippocampus(rng: np.random.Generator) -> _Hippocampus:
    g = float(np.clip(rng.lognormal(0.0, 0.025), 0.92, 1.08))
    t = np.linspace(0.0, 1.0, _N_CENTRES)
    length = 25.0 * g
    medial, rise = rng.uniform(2.0, 5.0), rng.uniform(2.0, 5.0)
    # Shifted back by 2 mm so the bulky head and the thin tail leave the same room at both ends.
    along = length * (t - 0.5) + 2.0
    centres = np.stack([-medial * t**2, along, rise * t**2], axis=1)
    head = np.exp(-(((t - 0.12) / 0.15) ** 2))
    # A smooth random thickness profile per axis, so head and body shapes vary beyond the warp.
    wobble = 1.0 + 0.03 * _smooth_noise(rng, (2, _N_CENTRES), (0.0, 5.0))
    rx = g * (4.6 * (1.0 - 0.55 * t) + 2.2 * head) * wobble[0]
    rz = g * (3.4 * (1.0 - 0.5 * t) + 1.0 * head) * wobble[1]
    radii = np.stack([rx, 0.5 * (rx + rz), rz], axis=1)
    t_split = rng.uniform(0.28, 0.34)
    return _Hippocampus(
        centres=centres,
        radii=radii,
        y_split=float(np.interp(t_split, t, along)),
        rotation=_rotation(rng.uniform(-10, 10), rng.uniform(6, 18), rng.uniform(-8, 8)),
        origin=np.array([rng.uniform(-2, 2), rng.uniform(-1.5, 1.5), rng.uniform(-3, 1)]),
    )


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float | tuple[float, ...]) -> np.ndarray:
    """Gaussian-filtered white noise rescaled to unit standard deviation (float32)."""
    field = gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="reflect")
    return field / max(float(field.std()), 1e-6)


def _sweep_distance(local: np.ndarray, hip: _Hippocampus) -> tuple[np.ndarray, np.ndarray]:
    """Normalised distance m to the sweep and the normalised offset from the nearest ellipsoid.

    Only points inside the sweep's bounding box grown by ``_SHELL`` radii are computed (outside it m
    ≥ ``_SHELL`` for every ellipsoid); the rest get m = inf, which keeps this the cheap part of a subject.
    """
    centres, radii = hip.centres.astype(np.float32), hip.radii.astype(np.float32)
    lo = (centres - _SHELL * radii).min(axis=0)
    hi = (centres + _SHELL * radii).max(axis=0)
    near = np.flatnonzero(np.all((local > lo) & (local < hi), axis=1))
    points = local[near]
    dist2 = np.zeros((len(near), len(centres)), dtype=np.float32)
    for axis in range(3):  # per axis keeps the temporaries at (n, K) instead of (n, K, 3)
        term = (points[:, axis, None] - centres[None, :, axis]) / radii[None, :, axis]
        dist2 += term * term
    nearest = dist2.argmin(axis=1)
    m = np.full(len(local), np.inf, dtype=np.float32)
    m[near] = np.sqrt(dist2[np.arange(len(near)), nearest])
    offset = np.zeros_like(local)
    offset[near] = (points - centres[nearest]) / radii[nearest]
    return m, offset


def _anatomy(
    rng: np.random.Generator, shape: tuple[int, int, int], spacing: np.ndarray, stage: float
) -> tuple[np.ndarray, np.ndarray]:
    """Tissue classes and the label (0/1/2) on the voxel grid."""
    hip = _draw_hippocampus(rng)
    sigma_vox = tuple(5.0 / spacing)  # ~5 mm correlation length: bends the shape, barely changes its volume
    axes = [(np.arange(n, dtype=np.float32) - (n - 1) / 2.0) * s for n, s in zip(shape, spacing)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    grid += 0.7 * np.stack([_smooth_noise(rng, shape, sigma_vox) for _ in range(3)], axis=-1)
    local = ((grid - hip.origin) @ hip.rotation).reshape(-1, 3).astype(np.float32)

    m, offset = _sweep_distance(local, hip)
    # Angle around the long axis: within ~70° of superolateral is the temporal horn's side.
    cross = offset[:, [0, 2]]
    side = (cross @ _HORN_SIDE) / np.maximum(np.linalg.norm(cross, axis=1), 1e-6)
    f = 1.0 - _ATROPHY * stage

    # Far field: folded cortex, with sulci widening as the disease advances.
    cortex = _smooth_noise(rng, shape, tuple(2.5 / spacing)).reshape(-1)
    tissue = np.full(m.shape, _WM, dtype=np.uint8)
    tissue[cortex > 0.45] = _GM
    tissue[cortex > 1.5 - 0.4 * stage] = _CSF
    # Medial temporal lobe: a white matter shell, grey matter directly against the inferomedial side.
    tissue[m < _SHELL] = _WM
    tissue[(side < -0.2) & (m < 1.8)] = _GM
    amygdala_centre = hip.centres[np.argmax(hip.radii[:, 0])] + np.array([0.5, -5.0, 4.0])
    amygdala = np.linalg.norm((local - amygdala_centre) / np.array([5.0, 4.5, 4.0]), axis=1) < 1.0
    tissue[amygdala] = _AMYGDALA
    # Temporal horn over the superolateral side, and CSF wherever atrophy freed space.
    tissue[(side > 0.3) & (m < 1.1 + 0.7 * stage)] = _CSF
    tissue[(m >= f) & (m < 1.0)] = _CSF
    inside = m < f
    tissue[inside] = _HIPPOCAMPUS

    label = np.zeros(m.shape, dtype=np.uint8)
    label[inside] = np.where(local[inside, 1] < hip.y_split, 1, 2)
    return tissue.reshape(shape), label.reshape(shape)


def _render(rng: np.random.Generator, tissue: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """T1-like intensities: tissue means, scanner blur, bias field, Rician noise, arbitrary gain."""
    means = (_TISSUE_MEAN * (1.0 + rng.normal(0.0, 0.02, len(_TISSUE_MEAN)))).astype(np.float32)
    image = gaussian_filter(means[tissue], tuple(0.7 / spacing))
    image *= np.exp(0.12 * _smooth_noise(rng, tissue.shape, tuple(12.0 / spacing)))
    noise = rng.normal(0.0, 0.035, (2, *tissue.shape)).astype(np.float32)
    image = np.sqrt((image + noise[0]) ** 2 + noise[1] ** 2)
    return (image * np.float32(rng.uniform(600.0, 1000.0))).astype(np.float32)


def _lps_affine(shape: tuple[int, int, int], spacing: np.ndarray) -> np.ndarray:
    """LPS-style voxel-to-world matrix (axes point left, posterior, superior) centred on the volume."""
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = -affine[:3, :3] @ ((np.array(shape) - 1) / 2.0)
    return affine


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, path)


def _params(n_subjects: int, seed: int, shape: tuple[int, ...], spacing: tuple[float, ...]) -> dict:
    return {
        "generator_version": GENERATOR_VERSION,
        "n_subjects": int(n_subjects),
        "seed": int(seed),
        "shape": [int(n) for n in shape],
        "spacing": [float(s) for s in spacing],
    }


def _missing(rng: np.random.Generator, value: float | int | str, rate: float) -> float | int | str | None:
    """``value``, or None (an empty manifest cell) with probability ``rate``."""
    return None if rng.random() < rate else value


def generate_cohort(
    out_dir: str | Path,
    n_subjects: int,
    seed: int = 0,
    shape: tuple[int, int, int] = (40, 48, 40),
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.2),
) -> Path:
    """Write ``n_subjects`` synthetic subjects (images, labels, manifest, latent truth) under ``out_dir``.

    Args:
        out_dir: folder to write into (created if needed); existing files of the same names are replaced.
        n_subjects: number of subjects, ``sub-0000`` … ``sub-{n-1:04d}``.
        seed: cohort seed; subject ``i`` depends only on ``(seed, i)``.
        shape: nominal volume shape; each subject's shape differs by up to ±4 voxels per axis.
        spacing: voxel size in mm.

    Returns:
        The path of the manifest CSV.
    """
    if n_subjects < 1:
        raise ValueError(f"n_subjects must be at least 1, got {n_subjects}")
    spacing_arr = np.asarray(spacing, dtype=np.float64)
    if len(shape) != 3 or len(spacing) != 3 or np.any(spacing_arr <= 0):
        raise ValueError(f"shape and spacing must be 3 positive values each, got {shape} and {spacing}")
    smallest = (np.asarray(shape) - _SHAPE_JITTER) * spacing_arr
    if np.any(smallest < _MIN_EXTENT_MM):
        raise ValueError(
            f"shape {tuple(shape)} × spacing {tuple(spacing)} mm is too small for the anatomy: the axes need at "
            f"least {_MIN_EXTENT_MM.tolist()} mm after a {_SHAPE_JITTER}-voxel shrink"
        )
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    # Removed first and written last, so an interrupted run never looks like a finished cohort.
    (out / "cohort.json").unlink(missing_ok=True)

    voxel_mm3 = float(np.prod(spacing_arr))
    rows, latent = [], []
    for i in range(n_subjects):
        rng = np.random.default_rng([seed, i])
        subject_id = f"sub-{i:04d}"
        subject = _draw_subject(rng)
        size = tuple(int(n) for n in np.asarray(shape) + rng.integers(-_SHAPE_JITTER, _SHAPE_JITTER + 1, 3))
        tissue, label = _anatomy(rng, size, spacing_arr, subject.stage)
        image = _render(rng, tissue, spacing_arr)
        affine = _lps_affine(size, spacing_arr)
        _save(image, affine, out / "images" / f"{subject_id}.nii.gz")
        _save(label, affine, out / "labels" / f"{subject_id}.nii.gz")

        rows.append({
            "subject_id": subject_id,
            "image": f"images/{subject_id}.nii.gz",
            "label": f"labels/{subject_id}.nii.gz",
            "age": _missing(rng, subject.age, 0.10),
            "sex": _missing(rng, subject.sex, 0.03),
            "education_years": _missing(rng, subject.education, 0.10),
            "apoe4": _missing(rng, subject.apoe4, 0.10),
            "mmse": subject.mmse,
            "cdr": subject.cdr,
            "time": subject.time,
            "event": subject.event,
        })
        counts = np.bincount(label.ravel(), minlength=3)
        latent.append({
            "subject_id": subject_id,
            "stage": round(subject.stage, 6),
            "volume_anterior_mm3": round(counts[1] * voxel_mm3, 3),
            "volume_posterior_mm3": round(counts[2] * voxel_mm3, 3),
            "volume_total_mm3": round((counts[1] + counts[2]) * voxel_mm3, 3),
        })

    manifest = pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))
    # Nullable integers, so present values print as "1" (not "1.0") and missing ones as empty cells.
    for column in ("education_years", "apoe4"):
        manifest[column] = manifest[column].astype("Int64")
    manifest_path = out / "manifest.csv"
    manifest.to_csv(manifest_path, index=False)
    pd.DataFrame(latent).to_csv(out / "latent.csv", index=False)
    (out / "cohort.json").write_text(json.dumps(_params(n_subjects, seed, shape, spacing), indent=2) + "\n")
    return manifest_path


def cohort_matches(
    out_dir: str | Path,
    n_subjects: int,
    seed: int,
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
) -> bool:
    """Whether ``out_dir`` holds a finished cohort generated with exactly these parameters (and this version)."""
    out = Path(out_dir)
    try:
        written = json.loads((out / "cohort.json").read_text())
    except (OSError, ValueError):
        return False
    return written == _params(n_subjects, seed, shape, spacing) and (out / "manifest.csv").is_file()
