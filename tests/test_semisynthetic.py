"""The semi-synthetic cohort on the real MSD hippocampus labels: determinism, independence of subjects,
manifest contract, dirty cases, and the strength of the simulated signal."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import shared_data
from lifelines.utils import concordance_index

from jointray.data.records import RESERVED_COLUMNS
from jointray.data.semisynthetic import CLINICAL_COLUMNS, OutcomeNoise, oracle_features, semisynthetic_manifest
from jointray.data.sources import scan_manifest

#: The cases of the shipped MSD folder that have no partner file (see ../shared/data/README.md).
DIRTY = {"hippocampus_118", "hippocampus_010", "hippocampus_281"}


@pytest.fixture(scope="module")
def msd() -> Path:
    return shared_data("msd_hippocampus")


@pytest.fixture(scope="module")
def cohort(msd: Path, tmp_path_factory: pytest.TempPathFactory):
    """The full cohort at seed 0, shared by the statistical tests (about a second)."""
    result = semisynthetic_manifest(msd, tmp_path_factory.mktemp("semi"), seed=0)
    return result, oracle_features(result.truth, result.manifest)


def _ols(columns: list[np.ndarray], y: np.ndarray) -> tuple[float, float]:
    """R² and mean absolute error of an ordinary least-squares fit with intercept."""
    x = np.column_stack([np.ones(len(y)), *columns])
    residual = y - x @ np.linalg.lstsq(x, y, rcond=None)[0]
    return 1.0 - residual.var() / y.var(), float(np.abs(residual).mean())


def test_same_seed_same_bytes_other_seed_differs(msd: Path, cohort, tmp_path: Path) -> None:
    result, _ = cohort
    again = semisynthetic_manifest(msd, tmp_path / "again", seed=0)
    other = semisynthetic_manifest(msd, tmp_path / "other", seed=1)
    for name in ("manifest", "truth", "cohort"):
        assert getattr(again, name).read_bytes() == getattr(result, name).read_bytes()
    a, b = pd.read_csv(result.manifest), pd.read_csv(other.manifest)
    assert (a["image"] == b["image"]).all() and not a["mmse"].equals(b["mmse"]) and not a["age"].equals(b["age"])
    # The volumes come from the labels, not the seed.
    assert pd.read_csv(result.truth)["volume_total_mm3"].equals(pd.read_csv(other.truth)["volume_total_mm3"])


def test_subject_does_not_depend_on_the_others(msd: Path, cohort, tmp_path: Path) -> None:
    result, _ = cohort
    full = pd.read_csv(result.manifest, dtype={"subject_id": str})
    dropped = list(full["subject_id"][::3])
    subset = semisynthetic_manifest(msd, tmp_path / "subset", seed=0, exclude=dropped)
    part = pd.read_csv(subset.manifest, dtype={"subject_id": str})
    assert subset.n_cases == len(part) == len(full) - len(dropped)
    expected = full[~full["subject_id"].isin(dropped)].reset_index(drop=True)
    pd.testing.assert_frame_equal(part, expected)
    assert json.loads(subset.cohort.read_text())["excluded"] == sorted(dropped)
    with pytest.raises(ValueError, match="no-such-subject"):
        semisynthetic_manifest(msd, tmp_path / "typo", exclude=["no-such-subject"])


def test_manifest_scans_cleanly_and_truth_stays_out(cohort) -> None:
    result, _ = cohort
    scan = scan_manifest(result.manifest, ["image"])
    assert scan.rejected == [] and len(scan.records) == result.n_cases == 220
    assert set(scan.clinical_columns) == set(CLINICAL_COLUMNS)
    assert set(CLINICAL_COLUMNS) == set(pd.read_csv(result.manifest).columns) - RESERVED_COLUMNS - {"image"}
    for record in scan.records:
        assert Path(record.images[0]).is_file() and Path(record.label).is_file()
        assert all(record.targets[t] is not None for t in ("mmse", "cdr", "time", "event"))
    manifest = pd.read_csv(result.manifest)
    assert not any("volume" in c or c.startswith("lp_") for c in manifest.columns)
    missing = manifest[["education_years", "apoe4"]].isna().mean()
    assert ((missing > 0.01) & (missing < 0.12)).all(), missing
    assert manifest[["age", "sex"]].notna().all().all()


def test_dirty_and_unreadable_cases_are_skipped_with_reasons(msd: Path, cohort, tmp_path: Path) -> None:
    result, _ = cohort
    assert {q.subject_id for q in result.skipped} == DIRTY
    assert all("unpaired" in q.reason for q in result.skipped)
    # A listed label that is not a NIfTI file is skipped too, and the rest is written.
    folder = tmp_path / "msd"
    shutil.copytree(msd, folder, ignore=shutil.ignore_patterns("hippocampus_1*", "hippocampus_2*"))
    (folder / "labelsTr" / "hippocampus_004.nii.gz").write_bytes(b"not a nifti")
    meta = json.loads((folder / "dataset.json").read_text())
    meta["training"] = [e for e in meta["training"] if (folder / e["image"]).exists()]
    (folder / "dataset.json").write_text(json.dumps(meta))
    small = semisynthetic_manifest(folder, tmp_path / "out", seed=0)
    broken = [q for q in small.skipped if q.subject_id == "hippocampus_004"]
    assert len(broken) == 1 and "cannot be read" in broken[0].reason
    assert small.n_cases == len(meta["training"]) - 1
    assert "hippocampus_004" in {s["subject_id"] for s in json.loads(small.cohort.read_text())["skipped"]}


def test_mmse_signal_is_mostly_in_the_volume(cohort) -> None:
    _, table = cohort
    y = table["mmse"].to_numpy(float)
    covariates = [table[c].fillna(table[c].mean()).to_numpy(float) for c in ("age", "education_years", "apoe4")]
    covariates.append((table["sex"] == "F").to_numpy(float))
    volume = table["volume_total_mm3"].to_numpy(float)
    mae_mean = float(np.abs(y - y.mean()).mean())
    r2_volume, _ = _ols([volume], y)
    r2_full, mae_full = _ols([volume, *covariates], y)
    r2_cov, mae_cov = _ols(covariates, y)
    print(f"R² volume {r2_volume:.3f}, full {r2_full:.3f}, covariates {r2_cov:.3f}; "
          f"MAE mean {mae_mean:.3f}, full {mae_full:.3f}, covariates {mae_cov:.3f}")
    assert 0.35 <= r2_volume <= 0.6
    assert 0.5 <= r2_full <= 0.72 and 0.05 <= r2_full - r2_volume <= 0.25
    assert mae_full / mae_mean < 0.8
    # The covariates alone are clearly worse: the image holds most of what there is to know.
    assert r2_cov < 0.3 and r2_full - r2_cov >= 0.25 and mae_full < 0.8 * mae_cov
    assert y.min() >= 0 and y.max() <= 30


def test_cdr_stages_and_survival(cohort) -> None:
    _, table = cohort
    assert set(table["cdr"]) == {0.0, 0.5, 1.0, 2.0}
    assert (table["time"] > 0).all() and set(table["event"]) == {0, 1}
    assert 0.2 <= table["event"].mean() <= 0.8
    # Smaller hippocampus, earlier conversion: Harrell's C of the volume as a predicted survival time.
    c_index = concordance_index(table["time"], table["volume_total_mm3"], table["event"])
    print(f"event rate {table['event'].mean():.3f}, C-index {c_index:.3f}, CDR "
          f"{table['cdr'].value_counts(normalize=True).sort_index().round(3).to_dict()}")
    assert c_index > 0.6
    # CDR rises as MMSE falls (one latent severity).
    assert table.groupby("cdr")["mmse"].mean().is_monotonic_decreasing


def test_noise_is_validated_and_recorded(msd: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="missing_rate"):
        OutcomeNoise(missing_rate=1.0)
    result = semisynthetic_manifest(msd, tmp_path, seed=2, noise=OutcomeNoise(mmse_sd=0.0, missing_rate=0.0))
    info = json.loads(result.cohort.read_text())
    assert info["noise"] == {"mmse_sd": 0.0, "cdr_sd": 0.6, "missing_rate": 0.0} and info["seed"] == 2
    assert info["n_cases"] == 220 and info["source"]["licence"] == "CC-BY-SA 4.0"
    table = oracle_features(result.truth, result.manifest)
    assert table.notna().all().all()
    # Without noise, MMSE is the linear predictor itself (up to rounding and the 0–30 clip).
    truth = pd.read_csv(result.truth)
    expected = np.clip(25.0 + truth["lp_mmse"], 0, 30)
    np.testing.assert_allclose(table["mmse"], expected, atol=0.051)
