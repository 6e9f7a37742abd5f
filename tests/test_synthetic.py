"""The synthetic cohort: determinism, manifest contract, label geometry, outcome model and hardness."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import REPO
from scipy.stats import pearsonr, spearmanr

from jointray.config import load_config
from jointray.data.records import RESERVED_COLUMNS
from jointray.data.sources import scan_manifest
from jointray.data.synthetic import CLINICAL_COLUMNS, MANIFEST_COLUMNS, cohort_matches, generate_cohort

N_LARGE = 200


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame, pd.DataFrame]:
    """One 200-subject cohort shared by the statistical tests (generation takes ~10 s)."""
    out = tmp_path_factory.mktemp("cohort")
    manifest_path = generate_cohort(out, N_LARGE, seed=0)
    return manifest_path, pd.read_csv(manifest_path), pd.read_csv(out / "latent.csv")


def _arrays(out: Path, subject_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    image = nib.load(out / "images" / f"{subject_id}.nii.gz")
    label = nib.load(out / "labels" / f"{subject_id}.nii.gz")
    return np.asarray(image.dataobj), np.asarray(label.dataobj), image.affine


def _best_window_dice(image: np.ndarray, foreground: np.ndarray, levels: int = 40) -> float:
    """Best Dice of ``lo <= image < hi`` against ``foreground`` over all windows between quantile levels."""
    edges = np.quantile(image, np.linspace(0.0, 1.0, levels + 1))
    bins = np.clip(np.searchsorted(edges, image, side="right") - 1, 0, levels - 1)
    all_cum = np.concatenate([[0], np.cumsum(np.bincount(bins.ravel(), minlength=levels))])
    fg_cum = np.concatenate([[0], np.cumsum(np.bincount(bins[foreground], minlength=levels))])
    lo, hi = np.triu_indices(levels + 1, 1)  # every window of whole bins, single thresholds included
    dice = 2.0 * (fg_cum[hi] - fg_cum[lo]) / ((all_cum[hi] - all_cum[lo]) + foreground.sum())
    return float(dice.max())


def test_same_seed_gives_identical_cohort(tmp_path: Path) -> None:
    a = generate_cohort(tmp_path / "a", 4, seed=3)
    b = generate_cohort(tmp_path / "b", 4, seed=3)
    assert a.read_bytes() == b.read_bytes()
    assert (a.parent / "latent.csv").read_bytes() == (b.parent / "latent.csv").read_bytes()
    for i in range(4):
        image_a, label_a, affine_a = _arrays(a.parent, f"sub-{i:04d}")
        image_b, label_b, affine_b = _arrays(b.parent, f"sub-{i:04d}")
        assert image_a.tobytes() == image_b.tobytes()
        assert label_a.tobytes() == label_b.tobytes()
        np.testing.assert_array_equal(affine_a, affine_b)


def test_subject_does_not_depend_on_cohort_size_but_on_seed(tmp_path: Path) -> None:
    small = generate_cohort(tmp_path / "n4", 4, seed=0).parent
    large = generate_cohort(tmp_path / "n6", 6, seed=0).parent
    other = generate_cohort(tmp_path / "seed1", 2, seed=1).parent
    for i in range(4):
        image_s, label_s, _ = _arrays(small, f"sub-{i:04d}")
        image_l, label_l, _ = _arrays(large, f"sub-{i:04d}")
        assert image_s.tobytes() == image_l.tobytes() and label_s.tobytes() == label_l.tobytes()
    pd.testing.assert_frame_equal(pd.read_csv(small / "manifest.csv"), pd.read_csv(large / "manifest.csv").head(4))
    image_o, label_o, _ = _arrays(other, "sub-0000")
    image_s, label_s, _ = _arrays(small, "sub-0000")
    assert image_o.shape != image_s.shape or not np.array_equal(image_o, image_s)
    assert not pd.read_csv(other / "manifest.csv").drop(columns=["subject_id", "image", "label"]).equals(
        pd.read_csv(small / "manifest.csv").head(2).drop(columns=["subject_id", "image", "label"])
    )


def test_cohort_matches_only_the_requested_parameters(tmp_path: Path) -> None:
    assert not cohort_matches(tmp_path, 3, 0, (40, 48, 40), (1.0, 1.0, 1.2))
    generate_cohort(tmp_path, 3, seed=0)
    assert cohort_matches(tmp_path, 3, 0, (40, 48, 40), (1.0, 1.0, 1.2))
    assert json.loads((tmp_path / "cohort.json").read_text())["n_subjects"] == 3
    assert not cohort_matches(tmp_path, 4, 0, (40, 48, 40), (1.0, 1.0, 1.2))
    assert not cohort_matches(tmp_path, 3, 1, (40, 48, 40), (1.0, 1.0, 1.2))
    assert not cohort_matches(tmp_path, 3, 0, (40, 48, 44), (1.0, 1.0, 1.2))
    assert not cohort_matches(tmp_path, 3, 0, (40, 48, 40), (1.0, 1.0, 1.0))
    (tmp_path / "cohort.json").write_text("{not json")
    assert not cohort_matches(tmp_path, 3, 0, (40, 48, 40), (1.0, 1.0, 1.2))


def test_too_small_field_of_view_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="too small"):
        generate_cohort(tmp_path, 1, shape=(24, 24, 24))


def test_manifest_contract(cohort: tuple[Path, pd.DataFrame, pd.DataFrame]) -> None:
    manifest_path, manifest, latent = cohort
    assert tuple(manifest.columns) == MANIFEST_COLUMNS
    assert list(manifest.subject_id) == [f"sub-{i:04d}" for i in range(N_LARGE)]
    for column in ("image", "label"):
        assert not any(Path(p).is_absolute() for p in manifest[column])
        assert all((manifest_path.parent / p).is_file() for p in manifest[column])
    assert "stage" not in manifest.columns and "stage" in latent.columns

    missing = manifest.isna().mean()
    for column in ("age", "education_years", "apoe4"):
        assert 0.04 <= missing[column] <= 0.18, (column, missing[column])
    assert 0.0 < missing["sex"] <= 0.08
    assert set(manifest.sex.dropna()) == {"F", "M"}
    assert set(manifest.apoe4.dropna()) <= {0, 1, 2}
    assert missing[["subject_id", "image", "label", "mmse", "cdr", "time", "event"]].sum() == 0

    assert (manifest.mmse == manifest.mmse.round()).all() and manifest.mmse.between(0, 30).all()
    assert set(manifest.cdr) <= {0.0, 0.5, 1.0, 2.0} and manifest.cdr.nunique() >= 3
    assert set(manifest.event) == {0, 1} and (manifest.time > 0).all()
    censored = 1.0 - manifest.event.mean()
    assert 0.3 <= censored <= 0.5, censored


def test_manifest_goes_through_the_manifest_source(cohort: tuple[Path, pd.DataFrame, pd.DataFrame]) -> None:
    manifest_path, _, _ = cohort
    scan = scan_manifest(manifest_path, ["image"])
    assert len(scan.records) == N_LARGE and not scan.rejected
    assert set(scan.clinical_columns) == {"age", "sex", "education_years", "apoe4"}


def test_the_demo_config_declares_every_clinical_column_of_the_cohort() -> None:
    assert CLINICAL_COLUMNS == {"age": "numeric", "sex": "categorical", "education_years": "numeric",
                                "apoe4": "numeric"}
    assert set(CLINICAL_COLUMNS) == set(MANIFEST_COLUMNS) - RESERVED_COLUMNS - {"image"}
    assert load_config(REPO / "configs" / "synthetic.yaml").data.clinical_columns == CLINICAL_COLUMNS
    assert load_config(REPO / "configs" / "msd_hippocampus.yaml").data.clinical_columns == {}  # no clinical table


def test_labels_geometry_and_orientation(cohort: tuple[Path, pd.DataFrame, pd.DataFrame]) -> None:
    manifest_path, manifest, latent = cohort
    out = manifest_path.parent
    shapes = set()
    for subject_id, truth in zip(manifest.subject_id, latent.itertuples()):
        image_nii = nib.load(out / "images" / f"{subject_id}.nii.gz")
        label_nii = nib.load(out / "labels" / f"{subject_id}.nii.gz")
        image, label = np.asarray(image_nii.dataobj), np.asarray(label_nii.dataobj)
        assert image.dtype == np.float32 and label.dtype == np.uint8 and image.shape == label.shape
        assert set(np.unique(label)) == {0, 1, 2}, subject_id
        assert nib.aff2axcodes(image_nii.affine) == ("L", "P", "S")
        np.testing.assert_array_equal(image_nii.affine, label_nii.affine)
        np.testing.assert_allclose(image_nii.header.get_zooms(), (1.0, 1.0, 1.2), rtol=1e-6)
        assert all(abs(n - d) <= 4 for n, d in zip(image.shape, (40, 48, 40)))
        shapes.add(image.shape)

        # The structures stay inside the field of view with a margin.
        where = np.argwhere(label > 0)
        assert where.min() >= 2 and (np.array(label.shape) - 1 - where.max(axis=0)).min() >= 2, subject_id
        # Head (1) lies anterior to body/tail (2) in world (RAS) coordinates.
        anterior = nib.affines.apply_affine(image_nii.affine, np.argwhere(label == 1)).mean(axis=0)
        posterior = nib.affines.apply_affine(image_nii.affine, np.argwhere(label == 2)).mean(axis=0)
        assert anterior[1] > posterior[1] + 5.0, subject_id
        # latent.csv volumes are the label's voxel counts times the voxel volume.
        voxel = 1.0 * 1.0 * 1.2
        assert truth.volume_anterior_mm3 == pytest.approx((label == 1).sum() * voxel)
        assert truth.volume_posterior_mm3 == pytest.approx((label == 2).sum() * voxel)
        assert np.isfinite(image).all() and image.min() >= 0.0
    assert len(shapes) > 10


def test_outcomes_follow_the_latent_stage(cohort: tuple[Path, pd.DataFrame, pd.DataFrame]) -> None:
    _, manifest, latent = cohort
    volume = latent.volume_total_mm3
    # Atrophy: volume falls with stage, by about a third from the mildest to the most severe quintile.
    assert pearsonr(latent.stage, volume).statistic < -0.4
    quintile = pd.qcut(latent.stage, 5, labels=False)
    ratio = volume[quintile == 4].mean() / volume[quintile == 0].mean()
    assert 0.55 < ratio < 0.85, ratio
    # Smaller hippocampi go with lower MMSE (positive correlation with volume).
    assert pearsonr(manifest.mmse, volume).statistic > 0.3
    assert spearmanr(manifest.cdr, latent.stage).statistic > 0.5
    events = manifest.event == 1
    assert latent.stage[events].mean() > latent.stage[~events].mean() + 0.05


def test_no_intensity_window_segments_the_hippocampus(cohort: tuple[Path, pd.DataFrame, pd.DataFrame]) -> None:
    manifest_path, manifest, _ = cohort
    for subject_id in manifest.subject_id[:5]:
        image, label, _ = _arrays(manifest_path.parent, subject_id)
        best = _best_window_dice(image, label > 0)
        assert best < 0.9, (subject_id, best)
