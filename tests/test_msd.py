"""The real MSD Task04 Hippocampus folder (../shared/data), end to end through the CLI on Ray."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import REPO, shared_data
from jointray.config import load_config
from jointray.data.preprocess import restore_to_original
from jointray.data.shards import geometry_from_row, read_spec
from jointray.data.sources import scan_msd
from jointray.data.augment import AUGMENT, Augmenter, stream_seed
from jointray.data.streaming import split_subjects, train_val_datasets

UNPAIRED = {
    "hippocampus_118": "unpaired: has no label in dataset.json",
    "hippocampus_010": "unpaired: has no image in dataset.json",
    "hippocampus_281": "unpaired: has no image in dataset.json",
}


@pytest.fixture(scope="module")
def msd_root():
    return shared_data("msd_hippocampus")


@pytest.fixture(scope="module")
def msd_prepared(msd_root, ray_session, tmp_path_factory):
    """``jointray prepare`` on the real folder, as a user runs it, connected to the session's Ray."""
    out = tmp_path_factory.mktemp("msd") / "prepared"
    env = os.environ | {"RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    proc = subprocess.run(
        [sys.executable, "-m", "jointray.cli", "prepare", "--config", str(REPO / "configs" / "msd_hippocampus.yaml"),
         f"data.root={msd_root}", f"data.output={out}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_scan_finds_220_pairs_and_reports_the_three_unpaired(msd_root):
    cfg = load_config(REPO / "configs" / "msd_hippocampus.yaml")
    scan = scan_msd(msd_root, cfg.data.label_names)
    assert len(scan.records) == 220
    assert {q.subject_id: q.reason for q in scan.rejected} == UNPAIRED


def test_cli_prepares_220_and_reports_3(msd_prepared):
    out, stdout = msd_prepared
    assert re.search(r"prepared\s*│\s*220\b", stdout) and re.search(r"quarantined\s*│\s*3\b", stdout), stdout
    report = json.loads((out / "report.json").read_text())
    assert (report["inputs"], report["prepared"], len(report["quarantined"])) == (223, 220, 3)
    assert {q["subject_id"]: q["reason"] for q in report["quarantined"]} == UNPAIRED
    assert report["warnings"] == []  # the 32 x 64 x 48 window holds every label whole
    spec = read_spec(out)
    assert spec.digest() == report["spec_digest"]
    table = pq.read_table(out / "shards", columns=["subject_id"])
    assert table.num_rows == 220 and len(set(table["subject_id"].to_pylist())) == 220


def test_prepared_labels_map_back_to_the_original_files_exactly(msd_prepared, msd_root):
    out, _ = msd_prepared
    table = pq.read_table(out / "shards", columns=[
        "subject_id", "label", "image", "source_label", "source_images", "original_shape", "original_affine",
        "resampled_shape", "crop_start", "affine"])
    rows = table.to_pylist()
    labels = table["label"].combine_chunks().to_numpy()
    images = table["image"].combine_chunks().to_numpy()
    assert labels.shape == (220, 32, 64, 48) and images.shape == (220, 1, 32, 64, 48)
    for row, label, image in zip(rows, labels, images):
        original, geometry = nib.load(row["source_label"]), geometry_from_row(row)
        restored = restore_to_original(label, geometry)
        np.testing.assert_array_equal(restored, np.asarray(original.dataobj), err_msg=row["subject_id"])
        # The image, z-scored over the whole image's foreground (MONAI's NormalizeIntensity, nonzero=True),
        # holds exactly those values wherever the window covers the original grid (the window may crop it).
        source = np.asarray(nib.load(json.loads(row["source_images"])[0]).dataobj, np.float64)
        foreground = source[source != 0]
        zscored = np.where(source != 0, (source - foreground.mean()) / foreground.std(), 0.0)
        covered = restore_to_original(np.ones(label.shape, np.uint8), geometry).astype(bool)
        np.testing.assert_allclose(restore_to_original(image[0], geometry)[covered], zscored[covered], atol=1e-5,
                                   err_msg=row["subject_id"])


def test_streaming_split_is_deterministic_and_augmentation_is_seeded(msd_prepared):
    out, _ = msd_prepared
    cfg = load_config(REPO / "configs" / "msd_hippocampus.yaml", ["train.augment.affine_prob=1.0"])
    train_ids, val_ids = split_subjects(out, cfg.train.n_folds, cfg.train.fold, cfg.train.seed)
    assert (len(train_ids), len(val_ids)) == (176, 44) and not set(train_ids) & set(val_ids)
    assert split_subjects(out, 5, 0, cfg.train.seed) == (train_ids, val_ids)
    assert split_subjects(out, 5, 0, cfg.train.seed + 1)[1] != val_ids
    all_val = set().union(*(split_subjects(out, 5, k, cfg.train.seed)[1] for k in range(5)))
    assert len(all_val) == 220  # the five folds cover every subject once

    train, val = train_val_datasets(out, cfg.train)
    stored = pq.read_table(out / "shards", columns=["subject_id", "image", "label"])
    stored_images = dict(zip(stored["subject_id"].to_pylist(), stored["image"].combine_chunks().to_numpy()))
    val_rows = val.take_all()
    assert sorted(r["subject_id"] for r in val_rows) == val_ids
    for r in val_rows:
        np.testing.assert_array_equal(r["image"], stored_images[r["subject_id"]])
    batches = list(train.iter_batches(batch_size=8, batch_format="numpy"))
    assert sorted(s for b in batches for s in b["subject_id"]) == train_ids
    first = batches[0]
    for s, img in zip(first["subject_id"], first["image"]):  # the datasets stream the stored rows unchanged
        np.testing.assert_array_equal(img, stored_images[s])
    # Augmentation (in the training worker): every case transformed when affine_prob=1, the same draw for
    # the same seed, another for the next batch index.
    augment = Augmenter(cfg.train.augment)
    once = augment(first, stream_seed(0, AUGMENT, 0, 0, 0))
    assert all(not np.array_equal(a, b) for a, b in zip(once["image"], first["image"]))
    np.testing.assert_array_equal(augment(first, stream_seed(0, AUGMENT, 0, 0, 0))["image"], once["image"])
    assert not np.array_equal(augment(first, stream_seed(0, AUGMENT, 0, 0, 1))["image"], once["image"])
    assert set(np.unique(once["label"])) <= {0, 1, 2} and once["label"].dtype == first["label"].dtype
    assert list(once["subject_id"]) == list(first["subject_id"])
    tensors = next(iter(train.select_columns(["image", "label"]).iter_torch_batches(batch_size=4)))
    assert tuple(tensors["image"].shape) == (4, 1, 32, 64, 48) and tensors["image"].dtype == torch.float32
    assert tuple(tensors["label"].shape) == (4, 32, 64, 48)
