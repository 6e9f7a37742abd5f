"""Shared fixtures: one local Ray instance per test session, and the real data beside the repo."""

from __future__ import annotations

import io
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

# Before Ray is imported anywhere: quiet, deterministic, no token auth for the local instance.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
# Train's controller polls its workers every 2 s by default and waits a poll at each step of a run's start and
# end; the suite's runs last seconds, so those waits were a large share of each run.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# Models fetched from storage URIs go to a cache of the session's own, not the user's ~/.cache.
os.environ.setdefault("JOINTRAY_CACHE", tempfile.mkdtemp(prefix="jointray-test-cache-"))
# The served test app asks for this API key; set before Ray starts so that its workers inherit it.
os.environ.setdefault("JOINTRAY_TEST_API_KEY", secrets.token_hex(16))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_data(name: str) -> Path:
    """A folder of ``../shared/data``; skipped where absent, but a failure under CI=true."""
    path = SHARED_DATA / name
    if not path.exists():
        message = f"real data {path} is absent (tests read ../shared/data in place)"
        if os.environ.get("CI") == "true":
            pytest.fail(message + "; CI must have it")
        pytest.skip(message)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on a free loopback port, with one bucket: (its pyarrow filesystem, the URI of
    ``runs-bucket/runs`` with credentials and options)."""
    import pyarrow.fs as pafs

    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.2)
        options = f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
        fs, _ = pafs.FileSystem.from_uri(f"s3://key:secret@runs-bucket/x?{options}&allow_bucket_creation=true")
        fs.create_dir("runs-bucket")
        yield fs, f"s3://key:secret@runs-bucket/runs?{options}"
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        from jointray.runtime import LOCAL_SYSTEM_CONFIG

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _system_config=LOCAL_SYSTEM_CONFIG)
    yield ray
    ray.shutdown()


#: MSD cases the shared checkpoint is trained on (the first ones of dataset.json); later ones are held out.
MSD_TRAIN_CASES = 40


def msd_subset(msd: Path, folder: Path, start: int, count: int) -> tuple[Path, list[dict[str, str]]]:
    """An MSD folder listing ``count`` of the shared cases by absolute path (the data stays in place)."""
    meta = json.loads((msd / "dataset.json").read_text())
    entries = [e for e in meta["training"] if (msd / e["image"]).exists() and (msd / e["label"]).exists()]
    chosen = entries[start:start + count]
    meta["training"] = [{"image": str((msd / e["image"]).resolve()), "label": str((msd / e["label"]).resolve())}
                        for e in chosen]
    folder.mkdir(parents=True)
    (folder / "dataset.json").write_text(json.dumps(meta))
    return folder, chosen


@pytest.fixture(scope="session")
def msd_checkpoint(ray_session, tmp_path_factory):
    """A small v2 trained for about a minute on 40 real MSD cases: enough to find the hippocampus. Shared by
    the evaluation, inference and serving tests (trained once per session)."""
    from jointray.config import load_config
    from jointray.data.prepare import prepare_dataset
    from jointray.train.trainer import run_training

    msd = shared_data("msd_hippocampus")
    root = tmp_path_factory.mktemp("msd_checkpoint")
    subset, _ = msd_subset(msd, root / "train_cases", 0, MSD_TRAIN_CASES)
    cfg = load_config(REPO / "configs" / "msd_hippocampus.yaml", [
        f"data.root={subset}", f"data.output={root / 'prepared'}", f"train.storage_path={root / 'runs'}",
        "train.name=msd_small", "train.epochs=16", "train.patience=null", "model.channels=[8,16,32,64]",
        "train.n_folds=5"])
    assert prepare_dataset(cfg).prepared == MSD_TRAIN_CASES
    return run_training(cfg, announce=lambda _: None).best_dir


@pytest.fixture(scope="session")
def msd_onnx(msd_checkpoint, tmp_path_factory):
    """The shared MSD checkpoint exported to ONNX (float32, with its Monte Carlo graph)."""
    from jointray.export.exporter import ExportSettings, export_model

    return export_model(msd_checkpoint, tmp_path_factory.mktemp("export") / "onnx", ExportSettings(format="onnx"))


def msd_held_out(index: int) -> tuple[Path, Path]:
    """(image, label) of a real MSD case that the shared checkpoint never saw (index 0, 1, ...)."""
    msd = shared_data("msd_hippocampus")
    meta = json.loads((msd / "dataset.json").read_text())
    entries = [e for e in meta["training"] if (msd / e["image"]).exists() and (msd / e["label"]).exists()]
    entry = entries[MSD_TRAIN_CASES + index]
    return msd / entry["image"], msd / entry["label"]


#: The synthetic training cohort: 20 subjects, 48³, augmentation off so two runs with one seed are comparable.
TRAIN_COHORT = ["data.format=synthetic", "data.synthetic.n_subjects=20", "preprocess.target_shape=[48,48,48]",
                "train.batch_size=4", "train.n_folds=4", "train.augment.enabled=false", "train.patience=null",
                "model.channels=[8,16,32,64]",
                "data.clinical_columns={age: numeric, sex: categorical, education_years: numeric, apoe4: numeric}"]


@pytest.fixture(scope="session")
def train_cohort(ray_session, tmp_path_factory):
    """(root, overrides): the synthetic cohort under ``root/cohort``, prepared under ``root/prepared``."""
    from jointray.config import load_config
    from jointray.data.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("train")
    overrides = [*TRAIN_COHORT, f"data.root={root / 'cohort'}", f"data.output={root / 'prepared'}"]
    report = prepare_dataset(load_config(None, overrides))
    assert report.prepared == 20
    return root, overrides


def cohort_cfg(train_cohort, storage, *extra):
    """The training cohort's config with runs under ``storage`` and ``extra`` overrides."""
    from jointray.config import load_config

    root, overrides = train_cohort
    return load_config(None, [*overrides, f"train.storage_path={storage}", *extra])


@pytest.fixture(scope="session")
def cross_validation(train_cohort, tmp_path_factory):
    """Folds 0 and 1 of 4, one epoch each, trained side by side (half a CPU per worker), and their ensemble:
    ``<storage>/cv``."""
    from jointray.train.folds import plan_folds, run_cross_validation

    storage = tmp_path_factory.mktemp("cross_validation")
    cfg = cohort_cfg(train_cohort, storage, "train.name=cv", "train.epochs=1", "train.folds=[0,1]",
                        "train.cpus_per_worker=0.5")
    assert plan_folds(cfg, 2) == (2, 1.0)
    return cfg, run_cross_validation(cfg, announce=lambda _: None)


@pytest.fixture(scope="session")
def one_epoch(cross_validation):
    """(ensemble folder, fold 0's TrainResult): one run of one epoch with trained outcome heads, shared by the
    tests that only read it."""
    cfg, folds = cross_validation
    return Path(cfg.train.storage_path) / "cv", folds.folds[0]


@pytest.fixture
def chromium():
    """A headless Chromium driven by selenium (Debian's chromium and chromium-driver; ``make test`` installs
    them as root); skipped where absent, a failure under CI=true."""
    import shutil

    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        message = "Debian's chromium and chromium-driver are needed (make test installs them as root)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1400,1000"):
        options.add_argument(flag)
    options.binary_location = shutil.which("chromium")
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))
    yield driver
    driver.quit()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    """A zip archive in memory with the given member names and contents."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def fail_switching_into(monkeypatch, target: Path) -> None:
    """Make ``os.replace`` fail when it moves a new folder onto ``target`` (a full disk at the switch);
    roll-backs of the ``.old-`` copy still work."""
    real_replace = os.replace

    def replace(src, dst):
        if str(dst) == str(target) and ".old-" not in str(src):
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
