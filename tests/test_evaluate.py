"""Batch evaluation on Ray Data with a checkpoint trained here on real MSD hippocampus MRI."""

import json
import math
import shutil
from pathlib import Path

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
from jointray.inference.evaluate import evaluate, summarize_cases
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
            voxels = int((predicted == next(k for k, v in STRUCTURES.items() if v == name)).sum())
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


def test_several_models_answer_as_one_only_when_they_take_the_same_input(checkpoint, tmp_path):
    """Two copies of one model average to that model (bit for bit: (p + p) / 2 = p), through the Ray Data
    actors; a model prepared differently, or a broken ensemble manifest, is refused before any actor starts."""
    from jointray.artifacts import CheckpointError, read_checkpoint, write_checkpoint, write_ensemble
    from jointray.data.sources import scan_msd

    msd = shared_data("msd_hippocampus")
    held_out, _ = _msd_subset(msd, tmp_path / "held_out", TRAIN_CASES + 12, 2)
    report = evaluate([checkpoint, checkpoint], held_out, tmp_path / "eval")
    assert report.predicted == 2 and report.checkpoint.count(",") == 1
    single = Predictor(checkpoint, device="cpu")
    for record in scan_msd(held_out, single.config.data.label_names).records:
        written = np.asarray(nib.load(tmp_path / "eval" / "masks" / Path(record.images[0]).name).dataobj)
        np.testing.assert_array_equal(written, single.predict(record).mask)

    loaded = read_checkpoint(checkpoint)
    other = loaded.spec.model_copy(update={"target_spacing": (1.5, 1.5, 1.5)})
    write_checkpoint(tmp_path / "other", loaded.state, loaded.config, other, loaded.schema, loaded.metrics,
                     loaded.trained_heads)
    with pytest.raises(CheckpointError, match="cannot answer as one: their PreprocessSpec differ"):
        evaluate([checkpoint, tmp_path / "other"], held_out, tmp_path / "out")
    with pytest.raises(CheckpointError, match="cannot answer as one"):
        write_ensemble(tmp_path / "mixed", [checkpoint, tmp_path / "other"], [])
    write_ensemble(tmp_path / "ensemble", [checkpoint], ["anterior"])
    manifest = tmp_path / "ensemble" / "ensemble.json"
    manifest.write_text(manifest.read_text().replace('"anterior"', '"amygdala"'))
    with pytest.raises(CheckpointError, match=r"post-processing names unknown structures \['amygdala'\]"):
        Predictor(tmp_path / "ensemble", device="cpu")
    manifest.write_text("{}")
    with pytest.raises(CheckpointError, match="not a jointray-ensemble manifest"):
        evaluate(tmp_path / "ensemble", held_out, tmp_path / "out")


def _icc_2_1(pred: np.ndarray, ref: np.ndarray) -> float:
    """Shrout & Fleiss ICC(2,1) of two methods, from the two-way ANOVA mean squares written out."""
    table = np.stack([pred, ref], axis=1)
    n, k = table.shape
    grand = table.mean()
    ms_rows = k * ((table.mean(axis=1) - grand) ** 2).sum() / (n - 1)
    ms_cols = n * ((table.mean(axis=0) - grand) ** 2).sum() / (k - 1)
    residual = table - table.mean(axis=1, keepdims=True) - table.mean(axis=0, keepdims=True) + grand
    ms_error = (residual**2).sum() / ((n - 1) * (k - 1))
    return (ms_rows - ms_error) / (ms_rows + (k - 1) * ms_error + k * (ms_cols - ms_error) / n)


def test_a_manifest_mixing_labelled_and_unlabelled_rows_is_summarised(checkpoint, tmp_path):
    """Rows that differ in their keys (a label or not) are summarised over the rows that have each input."""
    msd = shared_data("msd_hippocampus")
    _, chosen = _msd_subset(msd, tmp_path / "cases", TRAIN_CASES + 20, 8)
    manifest = pd.DataFrame([{"subject_id": f"case{i}", "image": str((msd / e["image"]).resolve()),
                              "label": str((msd / e["label"]).resolve()) if i % 2 == 0 else ""}
                             for i, e in enumerate(chosen)])  # case0, the first row, is labelled
    manifest.to_csv(tmp_path / "manifest.csv", index=False)
    report = evaluate(checkpoint, tmp_path / "manifest.csv", tmp_path / "out", tta=False)
    assert (report.inputs, report.predicted, report.quarantined) == (8, 8, [])
    table = pd.read_csv(tmp_path / "out" / "cases.csv").set_index("subject_id")
    labelled = table[table["has_label"]]
    assert list(labelled.index) == ["case0", "case2", "case4", "case6"]
    assert table.loc[~table["has_label"], "dice/anterior"].isna().all()
    metrics = json.loads((tmp_path / "out" / "summary.json").read_text())["metrics"]
    assert metrics == pytest.approx(report.metrics, nan_ok=True)
    assert metrics["cases"] == 8
    for name in STRUCTURES.values():
        pred, ref = labelled[f"volume/{name}"].to_numpy(), labelled[f"volume_ref/{name}"].to_numpy()
        assert metrics[f"mean_volume/{name}_mm3"] == pytest.approx(table[f"volume/{name}"].mean(), rel=1e-9)
        assert metrics[f"mean_volume_ref/{name}_mm3"] == pytest.approx(ref.mean(), rel=1e-9)
        assert metrics[f"dice/{name}"] == pytest.approx(labelled[f"dice/{name}"].mean(), abs=1e-6)
        assert metrics[f"missed/{name}"] == ((pred == 0) & (ref > 0)).sum() == labelled[f"missed/{name}"].sum()
        diff = pred - ref
        assert metrics[f"volume_pairs/{name}"] == 4
        assert metrics[f"volume_icc/{name}"] == pytest.approx(_icc_2_1(pred, ref), rel=1e-9)
        assert metrics[f"volume_bias_mm3/{name}"] == pytest.approx(diff.mean(), rel=1e-9)
        assert metrics[f"volume_loa_upper_mm3/{name}"] == pytest.approx(diff.mean() + 1.96 * diff.std(ddof=1),
                                                                         rel=1e-9)
        assert metrics[f"volume_loa_lower_mm3/{name}"] == pytest.approx(diff.mean() - 1.96 * diff.std(ddof=1),
                                                                         rel=1e-9)
        assert metrics[f"volume_abs_error_mm3/{name}"] == pytest.approx(np.abs(diff).mean(), rel=1e-9)
        assert metrics[f"volume_rel_error/{name}"] == pytest.approx((np.abs(diff) / ref).mean(), rel=1e-9)
        assert (table[f"volume/{name}"] > 0).all()  # a summary of real predictions, not of empty masks
    assert metrics["dice"] > 0.5, metrics


def test_a_missed_structure_is_counted_and_scored_at_its_worst_case():
    """``evaluate``'s rows carry volumes: a structure with no predicted voxel and a reference volume is a miss."""
    nan = math.nan
    targets = {"mmse": nan, "cdr": nan, "time": nan, "event": nan}
    rows = [
        {"subject_id": "a", "has_label": False, "volume/x": 900.0} | targets,
        {"subject_id": "b", "has_label": True, "volume/x": 0.0, "volume_ref/x": 800.0, "dice/x": 0.0,
         "hd95/x": 120.0} | targets,
        {"subject_id": "c", "has_label": True, "volume/x": 700.0, "volume_ref/x": 800.0, "dice/x": 0.9,
         "hd95/x": 2.0} | targets,
        {"subject_id": "d", "has_label": True, "volume/x": 0.0, "volume_ref/x": 0.0, "dice/x": 1.0,
         "hd95/x": nan} | targets,
    ]
    metrics = summarize_cases(rows, {1: "x"}, 4)
    assert [r.get("missed/x") for r in rows] == [None, 1.0, 0.0, 0.0]
    assert metrics["missed/x"] == 1 and metrics["missed"] == 1
    assert metrics["hd95/x"] == 61.0  # the miss at its worst case; both-empty "d" left out
    assert metrics["dice/x"] == pytest.approx(1.9 / 3)
    assert metrics["mean_volume/x_mm3"] == 400.0 and metrics["mean_volume_ref/x_mm3"] == pytest.approx(1600 / 3)
    assert metrics["volume_pairs/x"] == 3
