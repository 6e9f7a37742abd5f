"""A folder is replaced whole or not at all: on an error, on a hard crash at each step, and for the model
folders written by export_checkpoint and export_artifact."""

import subprocess
import sys

import pytest
import torch
from conftest import REPO, fail_switching_into

from jointray.artifacts import export_artifact, export_checkpoint, load_model, read_checkpoint, write_checkpoint
from jointray.atomic_dir import recover, staged_dir
from jointray.config import Config
from jointray.data.clinical import ClinicalSchema
from jointray.data.spec import PreprocessSpec

OLD = {"a.txt": "old", "only_old.txt": "old", "sub/b.txt": "old"}
NEW = {"a.txt": "new", "sub/b.txt": "new"}


def _write(folder, files):
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def _files(folder):
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def target(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    _write(folder, OLD)
    return folder


def test_the_new_folder_replaces_the_old_one_whole(target):
    with staged_dir(target) as staging:
        assert staging.parent == target.parent and staging != target
        _write(staging, NEW)
        assert _files(target) == OLD  # nothing visible before the switch
    assert _files(target) == NEW
    assert sorted(p.name for p in target.parent.iterdir()) == ["out"]


def test_a_first_write_creates_the_folder(tmp_path):
    with staged_dir(tmp_path / "deep" / "new") as staging:
        _write(staging, NEW)
    assert _files(tmp_path / "deep" / "new") == NEW


def test_an_error_while_building_leaves_the_old_folder_and_no_leftovers(target):
    with pytest.raises(RuntimeError, match="half way"), staged_dir(target) as staging:
        _write(staging, {"a.txt": "new"})
        raise RuntimeError("half way")
    assert _files(target) == OLD
    assert sorted(p.name for p in target.parent.iterdir()) == ["out"]


#: Writes NEW into the folder argv[1] through staged_dir and dies (os._exit: no cleanup, no finally) right
#: after os.replace call number argv[2], or half way through building when it is 0.
CRASHING_WRITER = """
import os, sys
from pathlib import Path
from jointray.atomic_dir import staged_dir

target, crash_after = Path(sys.argv[1]), int(sys.argv[2])
real_replace, calls = os.replace, []

def replace(src, dst):
    real_replace(src, dst)
    calls.append(dst)
    if len(calls) == crash_after:
        os._exit(9)

os.replace = replace
with staged_dir(target) as staging:
    (staging / "a.txt").write_text("new")
    if crash_after == 0:
        os._exit(9)
    (staging / "sub").mkdir()
    (staging / "sub" / "b.txt").write_text("new")
"""


@pytest.mark.parametrize("crash_after, expected", [(0, OLD), (1, OLD), (2, NEW)],
                         ids=["while-building", "between-the-renames", "before-removing-the-old"])
def test_a_crash_at_any_step_leaves_the_old_folder_or_the_new_one_whole(target, crash_after, expected):
    proc = subprocess.run([sys.executable, "-c", CRASHING_WRITER, str(target), str(crash_after)], check=False,
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    if crash_after == 1:
        assert not target.exists()  # the crash left only the previous folder, under its .old- name
    recover(target)
    assert _files(target) == expected
    with staged_dir(target) as staging:  # the next write clears what the crash left behind
        _write(staging, {"c.txt": "next"})
    assert _files(target) == {"c.txt": "next"}
    assert sorted(p.name for p in target.parent.iterdir()) == ["out"]


def _checkpoint(folder, value):
    write_checkpoint(folder, {"model": {"w": torch.full((3,), value)}, "epoch": int(value)}, Config(),
                     PreprocessSpec(), ClinicalSchema(), {"val/score": value}, [])
    return folder


@pytest.mark.parametrize("export,weights", [
    (export_checkpoint, lambda folder: read_checkpoint(folder).state["model"]["w"]),
    (export_artifact, lambda folder: load_model(folder).state_dict["w"]),
], ids=["best checkpoint", "serving artifact"])
def test_an_export_replaces_its_folder_whole_or_not_at_all(tmp_path, monkeypatch, export, weights):
    first, second = _checkpoint(tmp_path / "epoch_1", 1.0), _checkpoint(tmp_path / "epoch_2", 2.0)
    target = tmp_path / "export"
    export(first, target)
    fail_switching_into(monkeypatch, target)
    with pytest.raises(OSError, match="disk full"):
        export(second, target)
    monkeypatch.undo()
    assert weights(target).tolist() == [1.0, 1.0, 1.0]  # the old export, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_1", "epoch_2", "export"]
    export(second, target)
    assert weights(target).tolist() == [2.0, 2.0, 2.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_1", "epoch_2", "export"]
