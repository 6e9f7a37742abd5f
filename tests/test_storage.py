"""Remote storage behaves like local: a file:// URI, and S3 on a local S3-compatible server (moto), for runs and for
the models read from them."""

import json
import shutil
import tempfile
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch

from jointray.artifacts import CheckpointError, load_model, load_models, read_checkpoint
from jointray.config import load_config
from jointray.data.prepare import prepare_dataset
from jointray.storage import Storage, redact
from jointray.train.trainer import run_training

BASE = ["data.format=synthetic", "data.synthetic.n_subjects=12", "preprocess.target_shape=[48,48,48]",
        "train.batch_size=4", "train.n_folds=4", "train.augment.enabled=false", "train.patience=null",
        "model.channels=[8,16,32,64]"]


@pytest.fixture(scope="module")
def prepared(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("storage")
    overrides = [*BASE, f"data.root={root / 'cohort'}", f"data.output={root / 'prepared'}"]
    assert prepare_dataset(load_config(None, overrides)).prepared == 12
    return overrides


def _state(fs: pafs.FileSystem, path: str):
    """A checkpoint folder on ``fs`` read through a local copy."""
    with tempfile.TemporaryDirectory() as tmp:
        pafs.copy_files(path, tmp, source_filesystem=fs)
        return read_checkpoint(Path(tmp))


def _fresh_resume_and_best(prepared, storage_uri: str, fs: pafs.FileSystem, base: str, name: str):
    """Run, rerun fresh under the same name (train.resume=false), then resume; check each against storage."""
    run_training(load_config(None, [*prepared, f"train.storage_path={storage_uri}", f"train.name={name}",
                                    "train.epochs=1"]), announce=lambda _: None)
    first_weights = _state(fs, f"{base}/{name}/epoch_0000").state["model"]
    # train.resume=false with another seed: a run of its own from epoch 0, not a continuation of the first.
    fresh = run_training(load_config(None, [*prepared, f"train.storage_path={storage_uri}", f"train.name={name}",
                                            "train.epochs=2", "train.seed=1"]), announce=lambda _: None)
    # 9 training subjects in batches of 4: 3 steps an epoch.
    assert (fresh.final_metrics["epoch"], fresh.final_metrics["step"]) == (1, 6)
    own_weights = _state(fs, f"{base}/{name}/epoch_0000").state["model"]
    assert not all(torch.equal(own_weights[k], first_weights[k]) for k in first_weights)
    # The best checkpoint lives under the run on the storage itself, complete and verified.
    best = _state(fs, f"{base}/{name}/best")
    assert best.state["epoch"] in (0, 1) and best.config.train.seed == 1
    # train.resume=true continues the second run where it stopped.
    resumed = run_training(load_config(None, [*prepared, f"train.storage_path={storage_uri}", f"train.name={name}",
                                              "train.epochs=3", "train.seed=1", "train.resume=true"]),
                           announce=lambda _: None)
    assert (resumed.final_metrics["epoch"], resumed.final_metrics["step"]) == (2, 9)
    return fresh


def test_file_uri_storage_holds_the_run_and_its_best_checkpoint(prepared, tmp_path, monkeypatch):
    """A file:// URI is a local folder (the fresh/resume sequence is the S3 test's): the run, its checkpoints
    and best/ land there, nothing in the working directory."""
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory's ./runs
    storage = tmp_path / "storage"
    result = run_training(load_config(None, [*prepared, f"train.storage_path=file://{storage}", "train.name=f",
                                             "train.epochs=1"]), announce=lambda _: None)
    assert result.best_dir == storage / "f" / "best" and result.run_dir == storage / "f"
    assert _state(pafs.LocalFileSystem(), str(storage / "f" / "best")).state["epoch"] == 0
    assert (storage / "f" / "epoch_0000").is_dir() and not (tmp_path / "runs").exists()


def test_s3_storage_starts_fresh_resumes_and_exports_best_there(prepared, s3_server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fs, uri = s3_server
    fresh = _fresh_resume_and_best(prepared, uri, fs, "runs-bucket/runs", "s")
    assert fresh.best_dir == "s3://runs-bucket/runs/s/best"  # no credentials or options in what is shown
    assert not (tmp_path / "runs").exists()



def test_a_location_under_a_uri_keeps_its_credentials_and_options_and_messages_show_neither():
    uri = "s3://key:secret@bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http&region=us-east-1"
    storage = Storage.of(uri)
    assert storage.location("search", "trials") == ("s3://key:secret@bucket/runs/search/trials?endpoint_override="
                                                    "127.0.0.1:9000&scheme=http&region=us-east-1")
    assert Storage.of(storage.location("search")).base == "bucket/runs/search"
    assert storage.uri == redact(uri) == "s3://bucket/runs" and storage.where("x") == "s3://bucket/runs/x"
    assert redact("runs/local") == "runs/local"


def test_a_model_at_a_uri_is_fetched_once_per_content_and_an_ensemble_brings_only_its_members(one_epoch, tmp_path,
                                                                                              monkeypatch):
    """A file:// URI takes the remote path (an S3 one: tests/test_cluster.py): the ensemble answers as its folder
    does; the cache holds its manifest and member checkpoints only; a model or an ensemble's member replaced at
    the same URI is fetched anew; a URI with nothing there, or an ensemble listing absolute paths, is refused
    with the reason."""
    monkeypatch.setenv("JOINTRAY_CACHE", str(tmp_path / "cache"))
    ensemble, _ = one_epoch
    store = tmp_path / "store" / "cv"
    shutil.copytree(ensemble, store)
    uri = f"file://{store}"
    assert load_models(uri).version == load_models(ensemble).version
    (cached,) = (tmp_path / "cache" / "models").iterdir()
    files = sorted(str(p.relative_to(cached)) for p in cached.rglob("*") if p.is_file())
    assert files[0] == "ensemble.json" and {f.split("/best/")[0] for f in files[1:]} == {"fold_0", "fold_1"}
    assert load_models(uri).version == load_models(ensemble).version
    assert len(list((tmp_path / "cache" / "models").iterdir())) == 1  # the second load used the copy
    # fold 1's checkpoint put where fold 0's was: same URI, new content, a new copy.
    before = load_model(f"{uri}/fold_0/best").version
    shutil.rmtree(store / "fold_0" / "best")
    shutil.copytree(store / "fold_1" / "best", store / "fold_0" / "best")
    after = load_model(f"{uri}/fold_0/best").version
    assert after == load_model(store / "fold_1" / "best").version != before
    # The ensemble's own manifest did not change, its member did: fetched anew all the same.
    assert load_models(uri).version == load_models(store).version != load_models(ensemble).version
    with pytest.raises(CheckpointError, match=r"no model there \(ensemble.json, artifact.json, meta.json missing\)"):
        load_models(f"file://{tmp_path / 'store'}")
    manifest = json.loads((store / "ensemble.json").read_text())
    (store / "ensemble.json").write_text(json.dumps(manifest | {"members": [str(store / "fold_0" / "best")]}))
    with pytest.raises(CheckpointError, match="lists its members relative to itself"):
        load_models(uri)


def test_a_refusal_about_a_remote_storage_path_names_it_without_its_credentials(prepared):
    from jointray.config import ConfigError
    from jointray.train.folds import run_cross_validation
    from jointray.train.trainer import _mlflow_uri

    uri = "s3://key:secret@bucket/runs?endpoint_override=127.0.0.1:9&scheme=http&region=us-east-1"
    cfg = load_config(None, [*prepared, f"train.storage_path={uri}", "train.mlflow=true"])
    with pytest.raises(ConfigError, match=r"train.storage_path=s3://bucket/runs is remote") as folds:
        run_cross_validation(cfg, announce=lambda _: None)
    with pytest.raises(ConfigError, match=r"storage_path=s3://bucket/runs: set train.mlflow_tracking_uri") as mlflow:
        _mlflow_uri(cfg, Path("bucket/runs/x"), local=False)
    assert "secret" not in str(folds.value) + str(mlflow.value)
