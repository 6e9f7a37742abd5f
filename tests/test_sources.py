"""Sources beyond the MSD folder: DICOM series (folder and zip) in a manifest, the dicom format,
multi-channel manifests and a clinical table joined by subject_id."""

import shutil
import zipfile

import nibabel as nib
import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from conftest import shared_data
from jointray.config import load_config
from jointray.data.prepare import prepare_dataset, prepare_one
from jointray.data.records import Quarantined
from jointray.data.sources import scan_manifest, scan_source


def _zip_study(study, target):
    with zipfile.ZipFile(target, "w") as archive:
        for path in sorted(study.iterdir()):
            archive.write(path, arcname=f"series/{path.name}")
    return target


def test_dicom_folder_and_zip_in_a_manifest_prepare_identically(tmp_path):
    study = shared_data("dicom_hippocrop") / "study1"
    shutil.copytree(study, tmp_path / "study1")
    _zip_study(study, tmp_path / "study1.zip")
    pd.DataFrame([{"subject_id": "folder", "image": "study1", "age": 70},
                  {"subject_id": "zipped", "image": "study1.zip", "age": None}]).to_csv(tmp_path / "m.csv", index=False)
    cfg = load_config(None, ["preprocess.target_shape=[48,64,48]"])
    scan = scan_manifest(tmp_path / "m.csv", ["image"])
    rows = [prepare_one(r, cfg.preprocess, {0, 1, 2}, cfg.data.max_voxels, {"age": "numeric"}) for r in scan.records]
    assert not any(isinstance(r, Quarantined) for r in rows), rows
    np.testing.assert_array_equal(rows[0]["image"], rows[1]["image"])
    assert rows[0]["has_label"] is False
    # LPS series → RAS grid: the first voxel axis is flipped, so the affine's diagonal is positive.
    assert np.all(np.diag(rows[0]["affine"])[:3] > 0)
    assert np.isnan(rows[1]["clin_age"]) and rows[0]["clin_age"] == 70.0


def test_dicom_format_prepares_every_study_on_ray(ray_session, tmp_path):
    root = shared_data("dicom_hippocrop")
    cfg = load_config(None, ["data.format=dicom", f"data.root={root}", f"data.output={tmp_path}"])
    report = prepare_dataset(cfg)
    assert (report.inputs, report.prepared, report.quarantined) == (3, 3, [])
    table = pq.read_table(tmp_path / "shards", columns=["subject_id", "original_shape"])
    shapes = dict(zip(table["subject_id"].to_pylist(), table["original_shape"].combine_chunks().to_numpy().tolist()))
    assert shapes == {"study1": [35, 51, 32], "study2": [36, 48, 35], "study3": [34, 50, 40]}


def test_two_image_columns_make_two_channels_and_grids_must_match(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("t1", "t2"):
        nib.save(nib.Nifti1Image(rng.random((20, 24, 16)).astype(np.float32), np.eye(4)), tmp_path / f"{name}.nii.gz")
    shifted = np.eye(4)
    shifted[2, 3] = 5.0
    nib.save(nib.Nifti1Image(rng.random((20, 24, 16)).astype(np.float32), shifted), tmp_path / "moved.nii.gz")
    pd.DataFrame([{"subject_id": "a", "t1": "t1.nii.gz", "t2": "t2.nii.gz"},
                  {"subject_id": "b", "t1": "t1.nii.gz", "t2": "moved.nii.gz"}]).to_csv(tmp_path / "m.csv", index=False)
    cfg = load_config(None, ["preprocess.channels=2", "preprocess.target_shape=[32,32,16]"])
    good, bad = (prepare_one(r, cfg.preprocess, {0, 1, 2}, cfg.data.max_voxels, {})
                 for r in scan_manifest(tmp_path / "m.csv", ["t1", "t2"]).records)
    assert good["image"].shape == (2, 32, 32, 16)
    assert isinstance(bad, Quarantined) and bad.path.endswith("moved.nii.gz")
    assert "image affine differs from the image affine (max difference 5)" in bad.reason


def test_clinical_table_joins_by_subject_with_missing_values_and_duplicates(tmp_path):
    image = tmp_path / "img.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((8, 8, 8)).astype(np.float32), np.eye(4)), image)
    pd.DataFrame([{"subject_id": s, "image": image.name} for s in ("s1", "s2", "s3", "s4")]).to_csv(
        tmp_path / "m.csv", index=False)
    pd.DataFrame([
        {"subject_id": "s1", "apoe4": 1, "site": "A", "mmse": 27},
        {"subject_id": "s2", "apoe4": None, "site": None, "mmse": None},
        {"subject_id": "s4", "apoe4": 0, "site": "B", "mmse": 29},
        {"subject_id": "s4", "apoe4": 2, "site": "B", "mmse": 20},
        {"subject_id": "nobody", "apoe4": 2, "site": "C", "mmse": 10},
    ]).to_csv(tmp_path / "clinical.csv", index=False)
    cfg = load_config(None, ["data.format=manifest", f"data.root={tmp_path / 'm.csv'}",
                             f"data.clinical={tmp_path / 'clinical.csv'}",
                             "data.clinical_columns={apoe4: numeric, site: categorical}"])
    scan = scan_source(cfg.data)
    records = {r.subject_id: r for r in scan.records}
    assert set(records) == {"s1", "s2", "s3"}  # s3 has no clinical row: normal, kept
    assert records["s1"].clinical == {"apoe4": 1.0, "site": "A"} and records["s1"].targets["mmse"] == 27.0
    assert records["s2"].clinical == {"apoe4": None, "site": None} and records["s2"].targets["mmse"] is None
    assert records["s3"].clinical == {"apoe4": None, "site": None}
    assert [(q.subject_id, q.reason) for q in scan.rejected] == [("s4", "clinical table has 2 rows for this subject")]
