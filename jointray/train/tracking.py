"""Experiment tracking from the rank-0 worker: a JSON-lines history, TensorBoard event files, and MLflow
when enabled.

``<run>/history.jsonl`` holds one line per reported epoch, every scalar metric with its epoch: what
``jointray report`` draws the learning curves from, readable without TensorBoard. A resumed run
appends the epochs it repeats; :func:`read_history` keeps the last line of each epoch. TensorBoard
(``tensorboardX``) writes ``<run>/tensorboard/events.out.tfevents.*``. MLflow
(``train.mlflow: true``) logs the whole config as flattened, dotted parameters and every epoch's
metrics to ``train.mlflow_tracking_uri`` — by default a local SQLite file, ``<run>/mlflow.db``
(MLflow 3 keeps its plain file store in maintenance mode, behind an opt-in). A worker restarted
after a failure continues the same MLflow run, found by its run name, instead of starting a second.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from jointray.config import Config

#: MLflow refuses longer parameter values.
MLFLOW_PARAM_LIMIT = 6000
HISTORY_FILE = "history.jsonl"


def read_history(path: str | Path) -> list[dict[str, float]]:
    """The epochs of a ``history.jsonl``, in epoch order, the last line of each epoch winning."""
    epochs: dict[int, dict[str, float]] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            entry = json.loads(line)
            epochs[int(entry["epoch"])] = entry
    return [epochs[k] for k in sorted(epochs)]


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1e-3}}`` → ``{"train.lr": 1e-3}``; lists and other leaves are kept whole."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat |= flatten(value, f"{name}.")
        else:
            flat[name] = value
    return flat


class Tracker:
    """Per-epoch scalars to the history file, TensorBoard and/or MLflow; each target is optional (None = off)."""

    def __init__(self, cfg: Config, tensorboard_dir: str | None, mlflow_uri: str | None, resumed: bool,
                 history_file: str | None = None):
        self._tensorboard = None
        self._mlflow = None
        self._history = Path(history_file) if history_file else None
        if tensorboard_dir:
            from tensorboardX import SummaryWriter

            self._tensorboard = SummaryWriter(tensorboard_dir)
        if mlflow_uri:
            import mlflow

            self._mlflow = mlflow.MlflowClient(mlflow_uri)
            experiment = self._mlflow.get_experiment_by_name("jointray")
            experiment_id = (experiment.experiment_id if experiment is not None
                             else self._mlflow.create_experiment("jointray"))
            earlier = self._mlflow.search_runs([experiment_id], f"tags.`mlflow.runName` = '{cfg.train.name}'",
                                               order_by=["attributes.start_time DESC"], max_results=1)
            if resumed and earlier:
                self._run_id = earlier[0].info.run_id
                self._mlflow.update_run(self._run_id, status="RUNNING")
            else:
                self._run_id = self._mlflow.create_run(experiment_id, run_name=cfg.train.name).info.run_id
                for key, value in flatten(cfg.model_dump(mode="json")).items():
                    self._mlflow.log_param(self._run_id, key, str(value)[:MLFLOW_PARAM_LIMIT])

    def log(self, metrics: dict[str, float], epoch: int) -> None:
        scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if self._history is not None:
            with self._history.open("a") as stream:
                stream.write(json.dumps(scalars | {"epoch": epoch}) + "\n")
        if self._tensorboard is not None:
            for key, value in scalars.items():
                self._tensorboard.add_scalar(key, value, epoch)
            self._tensorboard.flush()
        if self._mlflow is not None:
            from mlflow.entities import Metric

            stamp = int(time.time() * 1000)
            self._mlflow.log_batch(self._run_id, metrics=[Metric(k, v, stamp, epoch) for k, v in scalars.items()])

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._mlflow is not None:
            self._mlflow.set_terminated(self._run_id, status="FINISHED")
