"""Build and run the Serve application: ``Ingress`` (HTTP, CPU work) → ``ModelServer`` (batched forward).

Settings come from the model's own config — the ``serve`` and ``inference`` sections of the config it
was trained with — plus dotted overrides of those two sections (``serve.max_batch_size=16``,
``inference.mc_mode=heads``); the model, data and preprocessing sections are the checkpoint's and
cannot be overridden. :func:`build_app` is also an application builder for a Serve config file::

    applications:
      - name: jointray
        import_path: jointray.serve.app:build_app
        args: {checkpoint: runs/synthetic/best, overrides: ["serve.max_batch_size=8"]}
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import requests
from pydantic import BaseModel
from ray import serve
from ray.serve import Application

from jointray.artifacts import read_config
from jointray.config import Config, ConfigError, config_from_tree
from jointray.serve.ingress import Ingress
from jointray.serve.model import ModelServer
from jointray.storage import is_uri

APP_NAME = "jointray"
SERVABLE_SECTIONS = ("serve.", "inference.")


class AppArgs(BaseModel):
    """Arguments of :func:`build_app`: a checkpoint or exported model folder (a path or a storage URI such as
    ``s3://bucket/runs/name/best``) and overrides of its config."""

    checkpoint: str
    overrides: list[str] = []


def serving_config(checkpoint: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The checkpoint's config with ``serve.*`` / ``inference.*`` overrides applied (others are refused)."""
    refused = [o for o in overrides if not o.strip().startswith(SERVABLE_SECTIONS)]
    if refused:
        raise ConfigError(f"overrides {refused}: only serve.* and inference.* can change at serving time; the "
                          "model, data and preprocessing are the checkpoint's")
    return config_from_tree(read_config(checkpoint).model_dump(mode="json"), overrides)


def build_app(args: AppArgs | dict) -> Application:
    """The Serve application for ``args.checkpoint`` (see the module docstring). A Serve config file passes
    ``args`` as a dict: Serve cannot see the AppArgs annotation through postponed evaluation."""
    args = AppArgs.model_validate(args) if isinstance(args, dict) else args
    # A local folder as an absolute path (replicas do not share the driver's working folder); a URI as it is,
    # fetched by each replica's node (jointray.artifacts.local_model).
    checkpoint = args.checkpoint if is_uri(args.checkpoint) else str(Path(args.checkpoint).resolve())
    cfg = serving_config(checkpoint, args.overrides)
    s = cfg.serve
    scaling = ({"autoscaling_config": {"min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
                                       "target_ongoing_requests": s.target_ongoing_requests}}
               if s.autoscale else {"num_replicas": s.replicas})
    model = ModelServer.options(
        max_ongoing_requests=s.max_ongoing_requests,
        ray_actor_options={"num_cpus": s.replica_cpus, "num_gpus": s.replica_gpus},
        user_config={"max_batch_size": s.max_batch_size, "batch_wait_timeout_s": s.batch_wait_timeout_s},
        **scaling,
    ).bind(checkpoint, cfg.inference.model_dump(), max(1, math.ceil(s.replica_cpus)))
    return Ingress.options(
        num_replicas=s.ingress_replicas, ray_actor_options={"num_cpus": s.ingress_cpus},
        max_ongoing_requests=s.ingress_max_ongoing_requests,
    ).bind(model, checkpoint, cfg.inference.model_dump(), s.max_upload_mb, s.api_key_env)


def free_port(preferred: int) -> int:
    """``preferred`` if nothing listens on it at 127.0.0.1, else a free port the OS picks."""
    import socket

    for port in (preferred, 0):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return probe.getsockname()[1]
    raise RuntimeError("no free port on 127.0.0.1")


def wait_until_healthy(url: str, timeout_s: float = 120.0) -> None:
    """Poll ``GET {url}/healthz`` until it answers 200 (RuntimeError after ``timeout_s``)."""
    deadline, last = time.monotonic() + timeout_s, "no answer"
    while time.monotonic() < deadline:
        try:
            response = requests.get(f"{url}/healthz", timeout=5)
            if response.status_code == 200:
                return
            last = f"{response.status_code} {response.text[:200]}"
        except requests.RequestException as exc:
            last = type(exc).__name__
        time.sleep(0.5)
    raise RuntimeError(f"{url}/healthz did not answer 200 within {timeout_s:.0f} s (last: {last})")


def start(checkpoint: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> str:
    """Deploy on the connected Ray instance with the HTTP proxy on ``serve.host:serve.port``; returns the URL
    once ``/healthz`` answers 200."""
    cfg = serving_config(checkpoint, overrides)
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port}, proxy_location=cfg.serve.proxy_location)
    serve.run(build_app(AppArgs(checkpoint=str(checkpoint), overrides=list(overrides))), name=APP_NAME,
              route_prefix="/", logging_config={"log_level": cfg.serve.log_level})
    url = f"http://{cfg.serve.host}:{cfg.serve.port}"
    wait_until_healthy(url)
    return url
