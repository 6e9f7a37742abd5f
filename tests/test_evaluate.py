"""Batch evaluation on Ray Data with a checkpoint trained here on real MSD hippocampus MRI."""

import json
import math
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import MSD_TRAIN_CASES as TRAIN_CASES
from conftest import msd_subset as _msd_subset
from conftest import shared_data
from jointray.config import ConfigError
from jointray.data.volumes import read_volume
from jointray.inference.evaluate import evaluate
from jointray.inference.predictor import Predictor
from jointray.metrics import segmentation_metrics

STRUCTURES = {1: "anterior", 2: "posterior"}


@pytest.fixture
def checkpoint(msd_checkpoint):
    """The session's model trained on the first 40 MSD cases (conftest); these tests use later ones."""
    return msd_checkpoint


def test_masks_are_written_in_each_inputs_space_and_the_csv_matches_them(checkpoint, tmp_path):
    msd = shared_data("msd_hippocampus")
    held_out, chosen = _msd_subset(msd, tmp_path / "held_out", TRAIN_CASES, 12)
    out = tmp_path / "eval"
    report = evaluate(checkpoint, held_out, out)
    assert (report.inputs, report.predicted, report.quarantined) == (12, 12, [])
    table = pd.read_csv(out / "cases.csv")
    assert len(table) == 12
    rows = table.set_index("image").to_dict("index")
    for entry in chosen:
        row = rows[str((msd / entry["image"]).resolve())]
        image = nib.load(msd / entry["image"])
        mask_path = out / "masks" / (msd / entry["image"]).name
        mask = nib.load(mask_path)
        assert mask.shape == image.shape and np.allclose(mask.affine, image.affine, atol=1e-6)
        assert mask.get_data_dtype() == np.uint8
        predicted = np.asarray(mask.dataobj)
        reference = np.asarray(nib.load(msd / entry["label"]).dataobj).astype(np.uint8)
        spacing = tuple(float(s) for s in image.header.get_zooms()[:3])
        recomputed = segmentation_metrics(torch.from_numpy(predicted[None]), torch.from_numpy(reference[None]),
                                          STRUCTURES, spacing)
        for name in STRUCTURES.values():
            assert row[f"dice/{name}"] == pytest.approx(float(recomputed[f"dice/{name}"][0]), abs=1e-6)
            voxels = int((predicted == [k for k, v in STRUCTURES.items() if v == name][0]).sum())
            assert row[f"volume/{name}"] == pytest.approx(voxels * np.prod(spacing), rel=1e-6)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"]["dice"] == pytest.approx(table[["dice/anterior", "dice/posterior"]].mean().mean(), abs=1e-6)
    # A minute of training on 40 cases already finds the structures: not a model that predicts nothing.
    assert summary["metrics"]["dice"] > 0.5, summary["metrics"]


def test_a_folder_with_a_broken_file_is_reported_not_fatal(checkpoint, tmp_path):
    msd = shared_data("msd_hippocampus")
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    for name in ("hippocampus_007.nii.gz", "hippocampus_004.nii.gz"):
        shutil.copy(msd / "imagesTr" / name, images / name)
        shutil.copy(msd / "labelsTr" / name, labels / name)
    (images / "broken.nii.gz").write_bytes((msd / "imagesTr" / "hippocampus_007.nii.gz").read_bytes()[:900])
    (labels / "broken.nii.gz").write_bytes(b"")
    (images / "unlabelled.nii.gz").write_bytes((msd / "imagesTr" / "hippocampus_006.nii.gz").read_bytes())
    report = evaluate(checkpoint, images, tmp_path / "out", labels=labels)
    assert report.inputs == 4 and report.predicted == 2
    reasons = {q.subject_id: q.reason for q in report.quarantined}
    assert reasons["unlabelled"] == f"no label unlabelled.nii.gz in {labels}"
    assert "broken" in reasons and str(images / "broken.nii.gz") in {q.path for q in report.quarantined}
    assert sorted(p.name for p in (tmp_path / "out" / "masks").iterdir()) == ["hippocampus_004.nii.gz",
                                                                             "hippocampus_007.nii.gz"]
    # Without labels every readable image is predicted, and the CSV has volumes but no Dice.
    shutil.rmtree(labels)
    report = evaluate(checkpoint, images, tmp_path / "unlabelled_out")
    assert report.predicted == 3 and [q.subject_id for q in report.quarantined] == ["broken"]
    table = pd.read_csv(tmp_path / "unlabelled_out" / "cases.csv")
    assert "dice/anterior" not in table.columns and (table["volume/anterior"] > 0).all()


def test_a_dicom_series_gets_its_mask_on_the_series_grid(checkpoint, tmp_path):
    series = shared_data("dicom_hippocrop") / "study1"
    report = evaluate(checkpoint, series, tmp_path / "out")
    assert report.predicted == 1
    mask = nib.load(tmp_path / "out" / "masks" / "study1.nii.gz")
    volume = read_volume(series, 10**9)
    assert mask.shape == volume.array.shape[:3]
    assert np.allclose(mask.affine, volume.affine, atol=1e-4)


def test_one_request_at_a_time_gives_what_the_batch_gave(checkpoint, tmp_path):
    """The serving path (one Predictor, one case) reproduces the batch path's numbers."""
    msd = shared_data("msd_hippocampus")
    held_out, _ = _msd_subset(msd, tmp_path / "one", 60, 2)
    evaluate(checkpoint, held_out, tmp_path / "out", batch_size=2)
    table = pd.read_csv(tmp_path / "out" / "cases.csv").set_index("subject_id")
    from jointray.data.sources import scan_msd

    predictor = Predictor(checkpoint)
    for record in scan_msd(held_out, STRUCTURES | {0: "background"}).records:
        single = predictor.predict(record)
        row = single.row()
        for key in ("dice/anterior", "dice/posterior", "volume/anterior", "volume/posterior"):
            assert row[key] == pytest.approx(table.loc[record.subject_id, key], abs=1e-6)
        assert not math.isnan(row["volume/anterior"])


def test_missing_or_corrupt_checkpoints_fail_first(checkpoint, tmp_path):
    from jointray.artifacts import CheckpointError

    with pytest.raises(CheckpointError, match="not a complete jointray checkpoint"):
        evaluate(tmp_path / "nothing", tmp_path, tmp_path / "out")
    with pytest.raises(ConfigError, match="does not exist"):
        evaluate(checkpoint, tmp_path / "nowhere", tmp_path / "out")
