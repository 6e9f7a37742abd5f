"""The driver side of training: check the request, build the TorchTrainer, run it, export the best checkpoint.

Everything that can be wrong with a request (missing shards, shards of another dataset or
preprocessing, more workers than CPUs, a resumed run of another model) fails here, before any worker
starts, with a message that says what to change. The run lands in ``<storage_path>/<train.name>/``
and its best checkpoint (by ``val/score``), its outcome heads refit on the trained network's features
(:mod:`jointray.train.refit`), is exported to ``<storage_path>/<train.name>/best/`` — with
``train.fold=all`` (every case trains, nothing is held out to choose by) the last checkpoint, as
trained — on
whatever filesystem ``storage_path`` names (a local folder, ``file://``, ``s3://``, ``gs://``):
local and remote storage behave alike, including ``train.resume=false`` starting afresh.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import ray.train
from ray.data import DataContext, ExecutionOptions
from ray.train.torch import TorchTrainer

from jointray.artifacts import META_FILE, export_checkpoint
from jointray.config import Config, ConfigError, config_from_tree
from jointray.data.clinical import ClinicalSchema
from jointray.data.provenance import check_shards_match
from jointray.data.resident import shard_row_bytes
from jointray.data.shards import CLINICAL_PREFIX, SHARDS_DIR, SPEC_FILE, read_spec
from jointray.data.streaming import DATA_TASK_CPUS, split_subjects, train_val_datasets
from jointray.models import build_model
from jointray.storage import Storage, redact
from jointray.train.loop import threads_for, train_loop_per_worker
from jointray.train.refit import refit_heads
from jointray.train.tracking import HISTORY_FILE

BEST_DIR = "best"
FAULT_MARKER = ".fault_injected"


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite (typically a learning rate too high for the model)."""


@dataclass
class TrainResult:
    run_dir: Path | str  # a local folder, or a URI for remote storage
    best_dir: Path | str
    metrics: dict[str, float]  # of the best checkpoint (after its heads were refit)
    final_metrics: dict[str, float]  # of the last epoch


@dataclass
class Placement:
    use_gpu: bool
    cpus_per_worker: float
    threads_per_worker: int


def plan_placement(cfg: Config, cpus: float | None = None) -> Placement:
    """Workers, CPUs and GPUs of one run, or a :class:`ConfigError` if it can never be scheduled (Ray
    would otherwise wait forever for resources that do not exist).

    Args:
        cfg: the run's config (``train.workers``, ``train.cpus_per_worker``, ``train.use_gpu``...).
        cpus: the CPUs this run may take; None: the whole cluster's (a search passes each trial's share,
            so that concurrent trials do not oversubscribe the machine).

    Unless ``train.cpus_per_worker`` says otherwise, the workers share the run's CPUs less what one
    Ray Data task needs (:data:`~jointray.data.streaming.DATA_TASK_CPUS`, left free on one node, or the
    data tasks that feed the workers would wait forever), and no worker asks for more than a node has.
    Each worker runs as many torch threads as it holds CPUs, rounded up (``train.threads_per_worker``
    overrides); the worker reads them from the resources Ray gave it.
    """
    resources = ray.cluster_resources()
    total, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    pool = total if cpus is None else min(cpus, total)
    workers = cfg.train.workers
    if workers > total:
        raise ConfigError(f"train.workers={workers} is more than the {total:g} CPUs of this Ray cluster; "
                          f"set train.workers to at most {int(total)} or add nodes")
    use_gpu = cfg.train.use_gpu if cfg.train.use_gpu is not None else gpus >= workers
    if use_gpu and gpus < workers:
        raise ConfigError(f"train.use_gpu=true with train.workers={workers} needs {workers} GPUs; the cluster has "
                          f"{gpus:g}")
    largest_node = max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["Alive"]), default=total)
    per_worker = cfg.train.cpus_per_worker or min((pool - DATA_TASK_CPUS) / workers, largest_node - DATA_TASK_CPUS)
    if per_worker <= 0 or per_worker * workers > pool:
        raise ConfigError(f"train.cpus_per_worker={per_worker:g} × {workers} workers does not fit the "
                          f"{pool:g} CPUs this run may use")
    threads = cfg.train.threads_per_worker or threads_for(per_worker)
    return Placement(use_gpu=bool(use_gpu), cpus_per_worker=per_worker, threads_per_worker=threads)


def prepared_folder(cfg: Config) -> Path:
    """The shards to train on, refused when they were prepared from another source (another folder,
    changed case files, other clinical columns or labels) or with other preprocessing."""
    prepared = Path(cfg.train.prepared or cfg.data.output)
    check_shards_match(prepared, cfg)
    if not (prepared / SPEC_FILE).is_file() or not (prepared / SHARDS_DIR).is_dir():
        raise ConfigError(f"no prepared shards at {prepared} (train.prepared, else data.output): run "
                          f"`jointray prepare` with this config first")
    shard_spec = read_spec(prepared)
    if shard_spec.digest() != cfg.preprocess.digest():
        raise ConfigError(f"the shards at {prepared} were prepared with preprocessing {shard_spec.digest()}, but this "
                          f"config's preprocess section is {cfg.preprocess.digest()}: prepare again with this config "
                          f"or make its preprocess section match {prepared / SPEC_FILE}")
    return prepared


def fit_clinical_schema(prepared: Path, train_ids: list[str]) -> ClinicalSchema:
    """Standardisation and categories from the training subjects only (no peeking at validation)."""
    shards = prepared / SHARDS_DIR
    columns = [c for c in pq.read_schema(next(shards.glob("*.parquet"))).names if c.startswith(CLINICAL_PREFIX)]
    table = pq.read_table(shards, columns=["subject_id", *columns])
    keep = set(train_ids)
    rows = [i for i, s in enumerate(table["subject_id"].to_pylist()) if s in keep]
    table = table.take(rows)
    return ClinicalSchema.fit({c: table[c].to_numpy(zero_copy_only=False) for c in columns})


def heads_with_targets(prepared: Path, train_ids: list[str], heads: list[str]) -> list[str]:
    """The configured outcome heads that some training subject has a target for (risk: an event)."""
    table = pq.read_table(prepared / SHARDS_DIR, columns=["subject_id", "mmse", "cdr", "time", "event"])
    keep = np.isin(np.asarray(table["subject_id"].to_pylist(), dtype=object), list(train_ids))
    column = {name: table[name].to_numpy(zero_copy_only=False).astype(np.float64)[keep]
              for name in ("mmse", "cdr", "time", "event")}
    seen = {"mmse": bool(np.isfinite(column["mmse"]).any()), "cdr": bool(np.isfinite(column["cdr"]).any()),
            "risk": bool((np.isfinite(column["time"]) & (column["event"] == 1)).any())}
    return [h for h in heads if seen[h]]


def _check_resume(cfg: Config, storage: Storage, run_path: str) -> None:
    checkpoints = sorted(i.path for i in storage.fs.get_file_info(pafs.FileSelector(run_path))
                         if i.type == pafs.FileType.Directory and i.base_name.startswith("epoch_")
                         and storage.exists(f"{i.path}/{META_FILE}"))
    if not checkpoints:
        return
    with storage.fs.open_input_stream(f"{checkpoints[-1]}/{META_FILE}") as stream:
        previous = config_from_tree(json.loads(stream.read())["config"])
    if previous.model != cfg.model:
        raise ConfigError(f"train.resume=true, but {storage.where(cfg.train.name)} holds a run of model "
                          f"{previous.model.variant} {previous.model.model_dump()} and this config asks for "
                          f"{cfg.model.variant} {cfg.model.model_dump()}: resume with the same model section or "
                          f"use a new train.name")


def _export_best(checkpoint: ray.train.Checkpoint, storage: Storage, run_path: str,
                 finish: Callable[[Path], dict[str, float] | None]) -> dict[str, float] | None:
    """Verify the best checkpoint and write it to ``<run>/best`` on the run's own filesystem, after
    ``finish`` (the head refit) has rewritten it locally; returns what ``finish`` returns."""
    with checkpoint.as_directory() as folder:
        if storage.local:
            export_checkpoint(Path(folder), Path(run_path) / BEST_DIR)
            return finish(Path(run_path) / BEST_DIR)
        with tempfile.TemporaryDirectory() as tmp:
            export_checkpoint(Path(folder), Path(tmp) / BEST_DIR)
            metrics = finish(Path(tmp) / BEST_DIR)
            # Object stores have no atomic rename: the old best/ goes first, then the new one is uploaded.
            if storage.exists(f"{run_path}/{BEST_DIR}"):
                storage.fs.delete_dir(f"{run_path}/{BEST_DIR}")
            pafs.copy_files(str(Path(tmp) / BEST_DIR), f"{run_path}/{BEST_DIR}",
                            destination_filesystem=storage.fs)
            return metrics


def _mlflow_uri(cfg: Config, run_dir: Path, local: bool) -> str | None:
    if not cfg.train.mlflow:
        return None
    if cfg.train.mlflow_tracking_uri:
        return cfg.train.mlflow_tracking_uri
    if not local:
        raise ConfigError(f"train.mlflow=true with train.storage_path={redact(cfg.train.storage_path)}: set "
                          f"train.mlflow_tracking_uri (a tracking server or a database) for a remote run")
    run_dir.mkdir(parents=True, exist_ok=True)  # SQLite creates the file, not its folder
    return f"sqlite:///{run_dir / 'mlflow.db'}"


def run_training(cfg: Config, announce=print, cpus: float | None = None,
                 callbacks: list[ray.train.UserCallback] | tuple = ()) -> TrainResult:
    """Train ``cfg`` on the connected Ray cluster (``ray.init`` done by the caller).

    A function of its arguments alone: everything the run writes (checkpoints, TensorBoard, the MLflow
    database, the fault-injection marker) and everything it may delete (a previous run of the same
    name, with ``train.resume=false``) lies in its run folder, ``<train.storage_path>/<train.name>``;
    MLflow's run is named ``train.name``. Runs with distinct names therefore never collide, which is
    what lets a search run its trials side by side (:mod:`jointray.tune`).

    Args:
        cfg: the whole configuration.
        announce: where the one-line summary of the plan goes (``print``; a search passes its logger).
        cpus: the CPUs this run may take (:func:`plan_placement`); None: the whole cluster's.
        callbacks: Ray Train callbacks, e.g. Tune's report bridge.
    """
    prepared = prepared_folder(cfg)
    spec = read_spec(prepared)
    placement = plan_placement(cfg, cpus)
    try:  # a variant that cannot take this data fails here, not on a worker
        build_model(cfg.model, spec.channels)
    except ValueError as exc:
        raise ConfigError(f"model.variant={cfg.model.variant} cannot train on {prepared}: {exc}") from exc
    storage = Storage.of(cfg.train.storage_path)
    run_path, local = f"{storage.base}/{cfg.train.name}", storage.local
    run_dir = storage.where(cfg.train.name)
    if storage.exists(run_path):
        if cfg.train.resume:
            _check_resume(cfg, storage, run_path)
        else:  # Ray Train would otherwise pick up the old run's state from storage
            announce(f"replacing the previous run at {run_dir} (set train.resume=true to continue it)")
            storage.fs.delete_dir(run_path)
    train_ids, val_ids = split_subjects(prepared, cfg.train.n_folds, cfg.train.fold, cfg.train.seed)
    # nnU-Net's "all" fold: validation scores training cases, so it may not choose; the last checkpoint wins.
    keep_last = cfg.train.fold == "all"
    chosen_by = "epoch" if keep_last else "val/score"
    if not train_ids or not val_ids:
        raise ConfigError(f"fold {cfg.train.fold} of {cfg.train.n_folds} leaves {len(train_ids)} training and "
                          f"{len(val_ids)} validation subjects; prepare more cases or lower train.n_folds")
    schema = fit_clinical_schema(prepared, train_ids)
    train_ds, val_ds = train_val_datasets(prepared, cfg.train)
    steps_per_epoch = math.ceil(len(train_ids) / cfg.train.workers / cfg.train.batch_size)
    shard_mb = shard_row_bytes(prepared) * math.ceil(len(train_ids) / cfg.train.workers) / 2**20
    resident = shard_mb <= cfg.train.resident_mb
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": cfg.model_dump_json(), "spec": spec.model_dump_json(), "schema": schema.model_dump_json(),
            "trained_heads": heads_with_targets(prepared, train_ids, cfg.model.heads),
            "steps_per_epoch": steps_per_epoch, "threads": cfg.train.threads_per_worker,
            "resident": resident,
            "fault_marker": str(Path(run_path, FAULT_MARKER)) if local else None,
            "tensorboard_dir": str(Path(run_path, "tensorboard")) if local else None,
            "history_file": str(Path(run_path, HISTORY_FILE)) if local else None,
            "mlflow_uri": _mlflow_uri(cfg, Path(run_path), local),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.workers, use_gpu=placement.use_gpu,
            resources_per_worker={"CPU": placement.cpus_per_worker}, placement_strategy=cfg.train.placement,
        ),
        run_config=ray.train.RunConfig(
            name=cfg.train.name, storage_path=storage.base, storage_filesystem=None if local else storage.fs,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.train.keep_checkpoints, checkpoint_score_attribute=chosen_by,
                checkpoint_score_order="max"),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            logging_config=ray.train.LoggingConfig(log_level=cfg.train.log_level),
            callbacks=list(callbacks),
        ),
        datasets={"train": train_ds, "val": val_ds},
        # Training data is split equally (DDP needs the same number of steps on every rank);
        # validation is read whole by each worker, which predicts its share (see the loop). Order is
        # preserved, so that which case lands in which batch on which rank is the same in every run
        # (and in a resumed one): the splitter then deals blocks out by count, not by who asks first.
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"], execution_options=_ordered()),
    )
    announce(f"training {cfg.model.variant} on {cfg.train.workers} worker(s) "
             f"({'GPU' if placement.use_gpu else 'CPU'}, {placement.cpus_per_worker:g} CPU and "
             f"{placement.threads_per_worker} thread(s) each): {len(train_ids)} training, {len(val_ids)} "
             f"validation subjects, {steps_per_epoch} steps per epoch; each worker's {shard_mb:.0f} MiB of training "
             f"data {'held in memory' if resident else 'streamed every epoch'} (train.resident_mb)")
    result = trainer.fit()
    last = result.metrics or {}
    if last.get("diverged"):
        losses = ", ".join(f"{k.removeprefix('train/')} {v:g}" for k, v in sorted(last.items()) if k.startswith("train/"))
        advice = f"lower train.lr (now {cfg.train.lr:g})" + ("" if cfg.train.grad_clip else " or set train.grad_clip")
        raise TrainingDiverged(f"{run_dir}: the training loss became non-finite in epoch {int(last['epoch']) + 1} "
                               f"({losses}) at learning rate {last['lr']:.3g}; {advice}")
    scored = [(c, m) for c, m in result.best_checkpoints if not math.isnan(m.get(chosen_by, math.nan))]
    if not scored:
        scored = result.best_checkpoints[-1:]
    checkpoint, metrics = max(scored, key=lambda cm: cm[1].get(chosen_by, -math.inf))
    # The refit chooses its epochs on validation cases: with fold=all those are training cases, so no refit.
    refit = _export_best(checkpoint, storage, run_path,
                         lambda best: None if keep_last else refit_heads(best, train_ds, val_ds, announce))
    metrics = refit or metrics
    return TrainResult(run_dir=run_dir, best_dir=storage.where(cfg.train.name, BEST_DIR), metrics=metrics,
                       final_metrics=result.metrics or {})


def _ordered() -> ExecutionOptions:
    options = copy.copy(DataContext.get_current().execution_options)
    options.preserve_order = True
    return options
