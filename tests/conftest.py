"""Shared fixtures: one local Ray instance per test session, and the real data beside the repo."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Before Ray is imported anywhere: quiet, deterministic, no token auth for the local instance.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")

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
