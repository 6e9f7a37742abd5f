"""Every kind of bad input gets a one-line reason naming the file, and none of them crashes a run."""

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from jointray.config import load_config
from jointray.data.prepare import prepare_dataset, prepare_one
from jointray.data.records import Quarantined
from jointray.data.sources import scan_manifest

LABELS = {0, 1, 2}
SHAPE = (12, 14, 10)


def _nifti(path: Path, array: np.ndarray, affine=None) -> str:
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), path)
    return path.name


def _good_pair(folder: Path, name: str, seed: int) -> tuple[str, str]:
    rng = np.random.default_rng(seed)
    label = np.zeros(SHAPE, np.uint8)
    label[3:7, 4:9, 2:6] = 1
    label[7:9, 4:9, 2:6] = 2
    image = rng.normal(50, 10, SHAPE).astype(np.float32) + 30 * (label > 0)
    return _nifti(folder / f"{name}.nii.gz", image), _nifti(folder / f"{name}_seg.nii.gz", label)


def _hostile_cohort(folder: Path) -> tuple[Path, dict[str, str]]:
    """A manifest of 3 good cases and one case per kind of bad input; returns it and subject → reason."""
    rows, expected = [], {}
    for i in range(3):
        image, label = _good_pair(folder, f"good{i}", i)
        rows.append({"subject_id": f"good{i}", "image": image, "label": label, "mmse": 28, "age": 70 + i})
    image, label = _good_pair(folder, "base", 9)

    def bad(subject, reason, image=image, label=label, **extra):
        rows.append({"subject_id": subject, "image": image, "label": label} | extra)
        expected[subject] = reason

    (folder / "garbage.nii.gz").write_bytes(b"this is not a NIfTI file at all" * 10)
    bad("unreadable", "unreadable NIfTI header", image="garbage.nii.gz")
    whole = (folder / image).read_bytes()
    (folder / "truncated.nii.gz").write_bytes(whole[: len(whole) // 2])
    bad("truncated", "truncated or corrupt data", image="truncated.nii.gz")
    bad("two_d", "not a 3D volume: shape (12, 14)", image=_nifti(folder / "flat.nii.gz", np.ones((12, 14), np.float32)))
    bad("four_d", "not a 3D volume: shape (12, 14, 10, 3)",
        image=_nifti(folder / "series.nii.gz", np.random.rand(*SHAPE, 3).astype(np.float32)))
    nan_image = np.random.rand(*SHAPE).astype(np.float32)
    nan_image[0, 0, :3] = np.nan
    nan_image[1, 1, 1] = np.inf
    bad("non_finite", "contains 4 non-finite values (NaN/Inf)", image=_nifti(folder / "nan.nii.gz", nan_image))
    bad("constant", "image is constant (value 7)", image=_nifti(folder / "const.nii.gz", np.full(SHAPE, 7, np.float32)))
    odd = np.asarray(nib.load(folder / label).dataobj).copy()
    odd[0, 0, 0] = 3
    bad("label_values", "label values [3] are not in the declared set [0, 1, 2]",
        label=_nifti(folder / "odd_seg.nii.gz", odd))
    bad("label_fraction", "label has non-integer values",
        label=_nifti(folder / "frac_seg.nii.gz", np.full(SHAPE, 0.5, np.float32)))
    bad("shape_mismatch", "label shape (12, 14, 9) does not match image shape (12, 14, 10)",
        label=_nifti(folder / "short_seg.nii.gz", np.zeros((12, 14, 9), np.uint8)))
    shifted = np.eye(4)
    shifted[0, 3] = 2.0
    bad("affine_mismatch", "label affine differs from the image affine (max difference 2)",
        label=_nifti(folder / "shift_seg.nii.gz", np.zeros(SHAPE, np.uint8), shifted))
    bad("missing", "file does not exist", image="nowhere.nii.gz")
    huge = nib.Nifti1Header()
    huge.set_data_shape((4096, 4096, 4096))
    huge.set_data_dtype(np.float32)
    (folder / "huge.nii").write_bytes(huge.binaryblock + b"\0" * 4 + b"\0" * 64)  # claims 256 GiB, holds 64 B
    bad("absurd_size", "header claims 68,719,476,736 voxels (4096, 4096, 4096), over the limit", image="huge.nii")
    bad("bad_mmse", "mmse=45 is outside 0..30", mmse=45)
    bad("bad_event", "event=2 is not 0 or 1", event=2)
    other_image, _ = _good_pair(folder, "other", 10)
    rows.append({"subject_id": "twin", "image": image, "label": label})
    rows.append({"subject_id": "twin", "image": other_image, "label": label})
    expected["twin"] = "subject_id 'twin' is listed 2 times with different files"
    manifest = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest, expected


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    return _hostile_cohort(folder)


def test_each_bad_input_is_quarantined_with_its_reason(hostile):
    manifest, expected = hostile
    cfg = load_config(None, ["data.max_voxels=1000000", "preprocess.target_shape=[16,16,16]"])
    scan = scan_manifest(manifest, ["image"])
    found = {q.subject_id: q for q in scan.rejected}
    for record in scan.records:
        result = prepare_one(record, cfg.preprocess, LABELS, cfg.data.max_voxels, {})
        if isinstance(result, Quarantined):
            found[record.subject_id] = result
    for subject, reason in expected.items():
        if subject == "twin":
            continue  # duplicates are found across the whole scan, checked below
        assert subject in found, f"{subject} was not quarantined"
        assert reason in found[subject].reason, (subject, found[subject].reason)
        assert Path(found[subject].path).name != "", subject
    assert found["truncated"].path.endswith("truncated.nii.gz")
    assert found["label_values"].path.endswith("odd_seg.nii.gz")
    assert {s for s in found if s.startswith("good")} == set()


def test_pipeline_survives_every_bad_input(hostile, ray_session, tmp_path):
    manifest, expected = hostile
    cfg = load_config(None, [f"data.root={manifest}", "data.format=manifest", f"data.output={tmp_path / 'out'}",
                             "data.max_voxels=1000000", "preprocess.target_shape=[16,16,16]",
                             "data.clinical_columns={age: numeric}"])
    report = prepare_dataset(cfg)
    n_rows = len(pd.read_csv(manifest))
    assert report.prepared == 3
    assert report.inputs == n_rows == report.prepared + len(report.quarantined)
    reasons = {}
    for q in report.quarantined:
        reasons.setdefault(q.subject_id, q.reason)
    for subject, reason in expected.items():
        assert reason in reasons[subject], (subject, reasons[subject])
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert on_disk["prepared"] == 3 and len(on_disk["quarantined"]) == n_rows - 3
    table = pq.read_table(tmp_path / "out" / "shards")
    assert sorted(table["subject_id"].to_pylist()) == ["good0", "good1", "good2"]
    ages = dict(zip(table["subject_id"].to_pylist(), table["clin_age"].to_pylist()))
    assert ages == {"good0": 70.0, "good1": 71.0, "good2": 72.0}


def test_gzip_bomb_header_is_refused_before_reading(tmp_path):
    # A valid header claiming a huge volume in a gzip that decompresses forever: the limit must hit first.
    huge = nib.Nifti1Header()
    huge.set_data_shape((2048, 2048, 1024))
    huge.set_data_dtype(np.uint8)
    path = tmp_path / "bomb.nii.gz"
    with gzip.open(path, "wb") as f:
        f.write(huge.binaryblock + b"\0" * 4)
        f.write(b"\0" * (1 << 20))
    from jointray.data.errors import InputError
    from jointray.data.volumes import read_volume

    with pytest.raises(InputError, match="over the limit of 1,000,000"):
        read_volume(path, max_voxels=1_000_000)
