"""Connecting to Ray: one place that decides between a local instance and an existing cluster."""

from __future__ import annotations

import os

import ray

from jointray.config import RayConfig


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
    ray.init(num_cpus=cfg.num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", logging_config=logging_config)
