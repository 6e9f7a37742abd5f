"""Connecting to Ray: one place that decides between a local instance and an existing cluster."""

from __future__ import annotations

import os

import ray

from jointray.config import RayConfig

#: The local instance's worker pool. Ray kills an idle worker process after 1 s once more than num_cpus are
#: alive, and a training run's actors (controller, workers, the data split coordinator) already hold more:
#: each epoch's read tasks then start a fresh Python process, import Ray and pyarrow, and the training step
#: waits for them. Idle workers kept for a minute (and up to 8 of them) serve every epoch's reads.
LOCAL_SYSTEM_CONFIG = {"idle_worker_killing_time_threshold_ms": 60_000, "num_workers_soft_limit": 8}


def init_ray(cfg: RayConfig) -> None:
    """Connect to ``cfg.address`` or ``$RAY_ADDRESS`` (set by ``ray job submit``), else start a local instance.

    A no-op when Ray is already initialised (tests start it once per session).
    """
    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    # Workers' root loggers at WARNING: Ray Train 2.60 logs every report (the whole metrics dict) at
    # INFO from a logger that its own LoggingConfig does not reach, burying the one line per epoch.
    logging_config = ray.LoggingConfig(log_level="WARNING")
    if address:  # a cluster (or a submitted job) keeps the environment its owner gave it
        ray.init(address=address, logging_config=logging_config)
        return
    # With the dashboard (on the loopback address only): Ray Train's placement-group cleaner asks the
    # State API, served by the dashboard, whether the run is alive; without it it logs a warning
    # every second of training.
    ray.init(num_cpus=cfg.num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", logging_config=logging_config,
             _system_config=LOCAL_SYSTEM_CONFIG)
