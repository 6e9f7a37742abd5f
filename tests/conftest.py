"""Shared fixtures: one local Ray instance per test session, and the real data beside the repo."""

from __future__ import annotations

import io
import json
import os
import secrets
import zipfile
from pathlib import Path

import pytest

# Before Ray is imported anywhere: quiet, deterministic, no token auth for the local instance.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
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


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
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
