"""prepare on small real NIfTI files: explicit clinical inputs, exact repeats against conflicting entries,
an interrupted run that leaves the previous output whole, and the source record that train checks."""

import json
import math
import os
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import fail_switching_into

from jointray.config import ConfigError, load_config
from jointray.data import prepare as prepare_module
from jointray.data.prepare import prepare_dataset
from jointray.data.provenance import check_shards_match
from jointray.data.shards import CLINICAL_PREFIX, read_spec
from jointray.data.sources import scan_source

SHAPE = (12, 14, 10)
AGE_SEX = "data.clinical_columns={age: numeric, sex: categorical}"


def _pair(folder, name, seed):
    """One image/label pair of real NIfTI files in ``folder``; returns their file names."""
    rng = np.random.default_rng(seed)
    label = np.zeros(SHAPE, np.uint8)
    label[3:7, 4:9, 2:6] = 1
    label[7:9, 4:9, 2:6] = 2
    image = rng.normal(50, 10, SHAPE).astype(np.float32) + 30 * (label > 0)
    nib.save(nib.Nifti1Image(image, np.eye(4)), folder / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(label, np.eye(4)), folder / f"{name}_seg.nii.gz")
    return f"{name}.nii.gz", f"{name}_seg.nii.gz"


def _manifest(folder, n=3, **columns):
    """A manifest of ``n`` cases s0..s{n-1} with mmse targets and the given extra columns (one value per case)."""
    rows = []
    for i in range(n):
        image, label = _pair(folder, f"s{i}", i)
        rows.append({"subject_id": f"s{i}", "image": image, "label": label, "mmse": 25 + i}
                    | {name: values[i] for name, values in columns.items()})
    pd.DataFrame(rows).to_csv(folder / "manifest.csv", index=False)
    return folder / "manifest.csv"


def _cfg(root, out, *extra, fmt="manifest"):
    return load_config(None, [f"data.format={fmt}", f"data.root={root}", f"data.output={out}",
                              "preprocess.target_shape=[16,16,16]", *extra])


# --- clinical inputs are explicit ---------------------------------------------------------------------


def test_only_declared_clinical_columns_reach_the_shards(ray_session, tmp_path):
    manifest = _manifest(tmp_path, age=[70, None, 81], sex=["F", "M", None], diagnosis=["AD", "CN", "MCI"],
                         extra_path=["a/x.nii.gz", "b/y.nii.gz", "c/z.nii.gz"])
    report = prepare_dataset(_cfg(manifest, tmp_path / "out", AGE_SEX))
    table = pq.read_table(tmp_path / "out" / "shards")
    assert sorted(c for c in table.column_names if c.startswith(CLINICAL_PREFIX)) == ["clin_age", "clin_sex"]
    rows = {r["subject_id"]: r for r in table.select(["subject_id", "clin_age", "clin_sex"]).to_pylist()}
    assert rows["s0"]["clin_age"] == 70.0 and math.isnan(rows["s1"]["clin_age"]) and rows["s2"]["clin_age"] == 81.0
    assert [rows[s]["clin_sex"] for s in ("s0", "s1", "s2")] == ["F", "M", None]
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert on_disk["clinical_columns"] == report.clinical_columns == {"age": "numeric", "sex": "categorical"}
    assert on_disk["clinical_features"] == "age (numeric), sex (categorical); not used: diagnosis, extra_path"


def test_without_clinical_columns_there_is_no_clinical_input_and_the_report_says_so(ray_session, tmp_path):
    manifest = _manifest(tmp_path, age=[70, 75, 81], diagnosis=["AD", "CN", "MCI"])
    report = prepare_dataset(_cfg(manifest, tmp_path / "out"))
    assert report.prepared == 3
    names = pq.read_table(tmp_path / "out" / "shards").column_names
    assert [c for c in names if c.startswith(CLINICAL_PREFIX)] == []
    expected = "none (data.clinical_columns is empty); not used: age, diagnosis"
    assert report.clinical_features == expected
    assert json.loads((tmp_path / "out" / "report.json").read_text())["clinical_features"] == expected


def test_a_listed_column_the_data_lacks_fails_naming_it_and_the_files(tmp_path):
    manifest = _manifest(tmp_path, age=[70, 75, 81])
    with pytest.raises(ConfigError) as caught:
        scan_source(_cfg(manifest, tmp_path / "out", "data.clinical_columns={age: numeric, bmi: numeric}").data)
    assert "lists ['bmi']" in str(caught.value) and str(manifest) in str(caught.value)

    pd.DataFrame([{"subject_id": "s0", "apoe4": 1}, {"subject_id": "s2", "apoe4": 0}]).to_csv(
        tmp_path / "clinical.csv", index=False)
    table = f"data.clinical={tmp_path / 'clinical.csv'}"
    with pytest.raises(ConfigError) as caught:
        scan_source(_cfg(manifest, tmp_path / "out", table, "data.clinical_columns={apoe4: numeric, bmi: numeric}").data)
    message = str(caught.value)
    assert "'bmi'" in message and str(manifest) in message and str(tmp_path / "clinical.csv") in message

    scan = scan_source(_cfg(manifest, tmp_path / "out", table, "data.clinical_columns={age: numeric, apoe4: numeric}").data)
    assert {r.subject_id: r.clinical for r in scan.records} == {
        "s0": {"age": 70.0, "apoe4": 1.0}, "s1": {"age": 75.0, "apoe4": None}, "s2": {"age": 81.0, "apoe4": 0.0}}


def test_a_numeric_column_holding_text_fails_naming_it(tmp_path):
    manifest = _manifest(tmp_path, age=["70", "seventy", "81"])
    with pytest.raises(ConfigError) as caught:
        scan_source(_cfg(manifest, tmp_path / "out", "data.clinical_columns={age: numeric}").data)
    message = str(caught.value)
    assert "'age' is declared numeric" in message and "'seventy'" in message and "s1" in message
    assert str(manifest) in message
    # Declared categorical, the same column is text and fine.
    scan = scan_source(_cfg(manifest, tmp_path / "out", "data.clinical_columns={age: categorical}").data)
    assert [r.clinical for r in scan.records] == [{"age": "70"}, {"age": "seventy"}, {"age": "81"}]


@pytest.mark.parametrize("override, message", [
    ("data.clinical_columns={mmse: numeric}", "'mmse'"),
    ("data.clinical_columns={age: numeric, subject_id: categorical}", "'subject_id'"),
    ("data.clinical_columns={label: categorical}", "'label'"),
    ("data.clinical_columns={t1: categorical}", "image column"),
    ("data.clinical_columns={age: ordinal}", "'numeric' or 'categorical'"),
])
def test_clinical_columns_cannot_be_targets_identifiers_or_images(override, message):
    with pytest.raises(ConfigError, match="data.clinical_columns") as caught:
        load_config(None, ["data.image_columns=[t1]", override])
    assert message in str(caught.value)


# --- exact repeats and conflicting entries ------------------------------------------------------------


def _msd(folder, entries):
    """An MSD folder whose dataset.json lists ``entries`` (image name, label name) in order."""
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    names = sorted({image for image, _ in entries} | {label for _, label in entries})
    for seed, name in enumerate(names):
        image, label = _pair(folder, name, seed)
        if any(name == i for i, _ in entries):
            shutil.move(folder / image, folder / "imagesTr" / image)
        if any(name == la for _, la in entries):
            shutil.move(folder / label, folder / "labelsTr" / image)
        for leftover in (folder / image, folder / label):
            leftover.unlink(missing_ok=True)
    meta = {"labels": {"0": "background", "1": "anterior", "2": "posterior"},
            "training": [{"image": f"./imagesTr/{i}.nii.gz", "label": f"./labelsTr/{la}.nii.gz"} for i, la in entries]}
    (folder / "dataset.json").write_text(json.dumps(meta))
    return folder


def test_an_exact_repeat_in_dataset_json_is_prepared_once_and_reported(ray_session, tmp_path):
    root = _msd(tmp_path / "msd", [("h1", "h1"), ("h2", "h2"), ("h2", "h2"), ("h3", "h3")])
    report = prepare_dataset(_cfg(root, tmp_path / "out", fmt="msd"))
    assert (report.inputs, report.prepared, report.quarantined) == (3, 3, [])
    table = pq.read_table(tmp_path / "out" / "shards", columns=["subject_id"])
    assert sorted(table["subject_id"].to_pylist()) == ["h1", "h2", "h3"]
    assert report.warnings == [{"subject_id": "h2", "message": f"listed 2 times in {root / 'dataset.json'} with "
                                                             "the same files and values; kept once"}]


def test_entries_that_disagree_are_all_quarantined_naming_their_files(tmp_path):
    root = _msd(tmp_path / "msd", [("h1", "h1"), ("h2", "h2"), ("h2", "h2b"), ("h3", "h3")])
    scan = scan_source(_cfg(root, tmp_path / "out", fmt="msd").data)
    assert [r.subject_id for r in scan.records] == ["h1", "h3"]
    assert [(q.subject_id, q.stage) for q in scan.rejected] == [("h2", "scan"), ("h2", "scan")]
    for q in scan.rejected:
        assert "subject_id 'h2' is listed 2 times with different files" in q.reason
        assert str(root / "labelsTr" / "h2.nii.gz") in q.reason and str(root / "labelsTr" / "h2b.nii.gz") in q.reason

    folder = tmp_path / "manifest"
    folder.mkdir()
    a, a_label = _pair(folder, "a", 0)
    b, _ = _pair(folder, "b", 1)
    rows = [{"subject_id": "s1", "image": a, "label": a_label, "mmse": 20},
            {"subject_id": "s1", "image": b, "label": a_label, "mmse": 20},  # another image: conflict
            {"subject_id": "s2", "image": a, "label": a_label, "mmse": 28},
            {"subject_id": "s2", "image": a, "label": a_label, "mmse": 28},  # exact repeat: kept once
            {"subject_id": "s3", "image": b, "label": a_label, "mmse": 28},
            {"subject_id": "s3", "image": b, "label": a_label, "mmse": 12}]  # same files, other target
    pd.DataFrame(rows).to_csv(folder / "m.csv", index=False)
    scan = scan_source(_cfg(folder / "m.csv", tmp_path / "out").data)
    assert [(r.subject_id, r.targets["mmse"]) for r in scan.records] == [("s2", 28.0)]
    reasons = [(q.subject_id, q.path, q.reason) for q in scan.rejected]
    assert [(s, p) for s, p, _ in reasons] == [("s1", str(folder / a)), ("s1", str(folder / b)),
                                               ("s3", str(folder / b)), ("s3", str(folder / b))]
    assert all(str(folder / a) in r and str(folder / b) in r for s, _, r in reasons if s == "s1")
    assert all("with the same files but different values (mmse)" in r for s, _, r in reasons if s == "s3")
    assert scan.warnings == [{"subject_id": "s2", "message": f"listed 2 times in {folder / 'm.csv'} with the same "
                                                             "files and values; kept once"}]


# --- the prepared output is switched in whole ---------------------------------------------------------


def _snapshot(out):
    """What a reader of ``out`` sees: spec digest, report, source record, image shapes, and stray siblings."""
    table = pq.read_table(out / "shards", columns=["subject_id", "image"])
    images = table["image"].combine_chunks().to_numpy()
    shapes = dict(zip(table["subject_id"].to_pylist(), (tuple(a.shape) for a in images)))
    siblings = sorted(p.name for p in out.parent.iterdir() if p.name != out.name and out.name in p.name)
    return (read_spec(out).digest(), (out / "report.json").read_text(), (out / "source.json").read_text(), shapes,
            siblings)


def test_an_interrupted_prepare_leaves_the_previous_output_whole(ray_session, tmp_path, monkeypatch):
    manifest = _manifest(tmp_path)
    out = tmp_path / "prepared" / "out"
    prepare_dataset(_cfg(manifest, out))
    old = _snapshot(out)
    assert old[3] == {f"s{i}": (1, 16, 16, 16) for i in range(3)} and old[4] == []
    bigger = _cfg(manifest, out, "preprocess.target_shape=[32,32,32]")

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    # The spec write fails after the new shards are written.
    monkeypatch.setattr(prepare_module, "write_spec", disk_full)
    with pytest.raises(OSError, match="disk full"):
        prepare_dataset(bigger)
    assert _snapshot(out) == old
    monkeypatch.undo()

    # The switch itself fails: moving the new folder into place.
    fail_switching_into(monkeypatch, out)
    with pytest.raises(OSError, match="disk full"):
        prepare_dataset(bigger)
    monkeypatch.undo()
    assert _snapshot(out) == old

    prepare_dataset(bigger)
    new = _snapshot(out)
    assert new[0] == bigger.preprocess.digest() != old[0]
    assert new[3] == {f"s{i}": (1, 32, 32, 32) for i in range(3)} and new[4] == []


def test_prepare_refuses_an_output_folder_holding_other_files(ray_session, tmp_path):
    manifest = _manifest(tmp_path)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="notes.txt"):
        prepare_dataset(_cfg(manifest, out))
    assert (out / "notes.txt").read_text() == "keep me"


# --- the shards record their source, and train refuses shards of another one --------------------------


@pytest.fixture(scope="module")
def two_sources(ray_session, tmp_path_factory):
    """Folders A and B holding the same three cases, and shards prepared from A."""
    root = tmp_path_factory.mktemp("sources")
    (root / "A").mkdir()
    manifest_a = _manifest(root / "A", age=[70, 75, 81])
    shutil.copytree(root / "A", root / "B")
    out = root / "prepared"
    assert prepare_dataset(_cfg(manifest_a, out, "data.clinical_columns={age: numeric}")).prepared == 3
    return manifest_a, root / "B" / "manifest.csv", out


def test_shards_prepared_from_another_folder_are_refused(two_sources):
    a, b, out = two_sources
    check_shards_match(out, _cfg(a, out, "data.clinical_columns={age: numeric}"))
    with pytest.raises(ConfigError) as caught:
        check_shards_match(out, _cfg(b, out, "data.clinical_columns={age: numeric}"))
    message = str(caught.value)
    assert f"the shards at {out} were prepared from manifest {a} (3 cases)" in message
    assert f"this config asks for manifest {b} (3 cases)" in message
    assert "jointray prepare --config" in message
    source = json.loads((out / "source.json").read_text())
    assert (source["format"], source["root"], source["cases"]) == ("manifest", str(a), 3)
    assert source["clinical_columns"] == {"age": "numeric"} and source["label_names"] == {
        "0": "background", "1": "anterior", "2": "posterior"}


def test_a_touched_case_file_or_other_settings_are_refused(two_sources):
    a, _, out = two_sources
    cfg = _cfg(a, out, "data.clinical_columns={age: numeric}")
    image = a.parent / "s1.nii.gz"
    before = image.stat()
    os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
    try:
        with pytest.raises(ConfigError, match=r"since then 1 case changed \(s1\)"):
            check_shards_match(out, cfg)
    finally:
        os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns))
    check_shards_match(out, cfg)
    with pytest.raises(ConfigError, match=r"data.clinical_columns: \{'age': 'numeric'\} then, \{\} now"):
        check_shards_match(out, _cfg(a, out))
    with pytest.raises(ConfigError, match="data.label_names"):
        check_shards_match(out, _cfg(a, out, "data.clinical_columns={age: numeric}",
                                     "data.label_names={0: background, 1: hippocampus}"))


def test_shards_without_a_source_record_must_be_prepared_again(two_sources, tmp_path):
    a, _, out = two_sources
    old = tmp_path / "old"
    shutil.copytree(out, old)
    (old / "source.json").unlink()
    with pytest.raises(ConfigError, match=f"the shards at {old} have no source.json.*prepare --config"):
        check_shards_match(old, _cfg(a, old, "data.clinical_columns={age: numeric}"))
    with pytest.raises(ConfigError, match=f"no prepared shards at {tmp_path / 'none'}.*prepare --config"):
        check_shards_match(tmp_path / "none", _cfg(a, tmp_path / "none", "data.clinical_columns={age: numeric}"))


def test_the_check_restores_shards_a_crash_left_mid_switch(two_sources, tmp_path):
    a, _, out = two_sources
    shutil.copytree(out, tmp_path / ".prepared.old-0123abcd")  # the state a crash between two renames leaves
    check_shards_match(tmp_path / "prepared", _cfg(a, tmp_path / "prepared", "data.clinical_columns={age: numeric}"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]
    assert read_spec(tmp_path / "prepared").digest() == read_spec(out).digest()


def test_a_synthetic_request_for_another_cohort_is_refused_without_generating_it(ray_session, tmp_path):
    base = ["data.synthetic.n_subjects=2", "preprocess.target_shape=[48,48,48]"]
    assert prepare_dataset(_cfg(tmp_path / "cohort", tmp_path / "out", *base, fmt="synthetic")).prepared == 2
    check_shards_match(tmp_path / "out", _cfg(tmp_path / "cohort", tmp_path / "out", *base, fmt="synthetic"))
    other = _cfg(tmp_path / "cohort", tmp_path / "out", *base, "data.synthetic.n_subjects=3", fmt="synthetic")
    with pytest.raises(ConfigError, match="data.synthetic"):
        check_shards_match(tmp_path / "out", other)
    assert sorted(p.name for p in (tmp_path / "cohort" / "images").iterdir()) == ["sub-0000.nii.gz", "sub-0001.nii.gz"]
