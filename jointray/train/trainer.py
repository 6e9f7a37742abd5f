"""The driver side of training: check the request, build the TorchTrainer, run it, export the best checkpoint.

Everything that can be wrong with a request (missing shards, a spec that differs from the shards',
more workers than CPUs, a resumed run of another model) fails here, before any worker starts, with
a message that says what to change. The run lands in ``<storage_path>/<train.name>/`` and its best
checkpoint (by ``val/score``) is exported to ``<storage_path>/<train.name>/best/``.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import ray
import ray.train
from ray.train.torch import TorchTrainer

from jointray.artifacts import META_FILE, export_checkpoint, read_checkpoint
from jointray.config import Config, ConfigError
from jointray.data.clinical import ClinicalSchema
from jointray.data.shards import CLINICAL_PREFIX, SHARDS_DIR, SPEC_FILE, read_spec
from jointray.data.streaming import split_subjects, train_val_datasets
from jointray.models import build_model
from jointray.train.loop import train_loop_per_worker

BEST_DIR = "best"
FAULT_MARKER = ".fault_injected"


@dataclass
class TrainResult:
    run_dir: Path
    best_dir: Path
    metrics: dict[str, float]  # of the best checkpoint
    final_metrics: dict[str, float]  # of the last epoch


@dataclass
class Placement:
    use_gpu: bool
    cpus_per_worker: float
    threads_per_worker: int


def plan_placement(cfg: Config) -> Placement:
    """Workers, CPUs and GPUs for this cluster, or a :class:`ConfigError` if it can never be scheduled
    (Ray would otherwise wait forever for resources that do not exist)."""
    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    workers = cfg.train.workers
    if workers > cpus:
        raise ConfigError(f"train.workers={workers} is more than the {cpus:g} CPUs of this Ray cluster; "
                          f"set train.workers to at most {int(cpus)} or add nodes")
    use_gpu = cfg.train.use_gpu if cfg.train.use_gpu is not None else gpus >= workers
    if use_gpu and gpus < workers:
        raise ConfigError(f"train.use_gpu=true with train.workers={workers} needs {workers} GPUs; the cluster has "
                          f"{gpus:g}")
    # Leave one CPU for the Ray Data pipeline, or the workers can hold every CPU while the data tasks
    # that feed them wait forever.
    per_worker = cfg.train.cpus_per_worker or (1.0 if cpus >= workers + 1 else (cpus - 1) / workers)
    if per_worker <= 0 or per_worker * workers > cpus:
        raise ConfigError(f"train.cpus_per_worker={per_worker:g} × {workers} workers does not fit the cluster's "
                          f"{cpus:g} CPUs")
    threads = cfg.train.threads_per_worker or max(1, int(cpus // workers))
    return Placement(use_gpu=bool(use_gpu), cpus_per_worker=per_worker, threads_per_worker=threads)


def _prepared_folder(cfg: Config) -> Path:
    prepared = Path(cfg.train.prepared or cfg.data.output)
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


def _check_resume(cfg: Config, run_dir: Path) -> None:
    metas = sorted(run_dir.glob(f"*/{META_FILE}"))
    if not metas:
        return
    previous = read_checkpoint(metas[-1].parent).config
    if previous.model != cfg.model:
        raise ConfigError(f"train.resume=true, but {run_dir} holds a run of model {previous.model.variant} "
                          f"{previous.model.model_dump()} and this config asks for {cfg.model.variant} "
                          f"{cfg.model.model_dump()}: resume with the same model section or use a new train.name")


def _mlflow_uri(cfg: Config, run_dir: Path, local: bool) -> str | None:
    if not cfg.train.mlflow:
        return None
    if cfg.train.mlflow_tracking_uri:
        return cfg.train.mlflow_tracking_uri
    if not local:
        raise ConfigError(f"train.mlflow=true with train.storage_path={cfg.train.storage_path}: set "
                          f"train.mlflow_tracking_uri (a tracking server or a database) for a remote run")
    run_dir.mkdir(parents=True, exist_ok=True)  # SQLite creates the file, not its folder
    return f"sqlite:///{run_dir / 'mlflow.db'}"


def run_training(cfg: Config, announce=print) -> TrainResult:
    """Train ``cfg`` on the connected Ray cluster (``ray.init`` done by the caller)."""
    prepared = _prepared_folder(cfg)
    spec = read_spec(prepared)
    placement = plan_placement(cfg)
    try:  # a variant that cannot take this data fails here, not on a worker
        build_model(cfg.model, spec.channels)
    except ValueError as exc:
        raise ConfigError(f"model.variant={cfg.model.variant} cannot train on {prepared}: {exc}") from exc
    storage = cfg.train.storage_path
    local = "://" not in storage
    run_dir = (Path(storage).resolve() if local else Path("runs")) / cfg.train.name
    if local and run_dir.exists():
        if cfg.train.resume:
            _check_resume(cfg, run_dir)
        else:
            announce(f"replacing the previous run at {run_dir} (set train.resume=true to continue it)")
            shutil.rmtree(run_dir)
    train_ids, val_ids = split_subjects(prepared, cfg.train.n_folds, cfg.train.fold, cfg.train.seed)
    if not train_ids or not val_ids:
        raise ConfigError(f"fold {cfg.train.fold} of {cfg.train.n_folds} leaves {len(train_ids)} training and "
                          f"{len(val_ids)} validation subjects; prepare more cases or lower train.n_folds")
    schema = fit_clinical_schema(prepared, train_ids)
    train_ds, val_ds = train_val_datasets(prepared, cfg.train)
    steps_per_epoch = math.ceil(len(train_ids) / cfg.train.workers / cfg.train.batch_size)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": cfg.model_dump_json(), "spec": spec.model_dump_json(), "schema": schema.model_dump_json(),
            "trained_heads": heads_with_targets(prepared, train_ids, cfg.model.heads),
            "steps_per_epoch": steps_per_epoch, "threads": placement.threads_per_worker,
            "fault_marker": str(run_dir / FAULT_MARKER) if local else None,
            "tensorboard_dir": str(run_dir / "tensorboard") if local else None,
            "mlflow_uri": _mlflow_uri(cfg, run_dir, local),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.workers, use_gpu=placement.use_gpu,
            resources_per_worker={"CPU": placement.cpus_per_worker}, placement_strategy=cfg.train.placement,
        ),
        run_config=ray.train.RunConfig(
            name=cfg.train.name,
            storage_path=str(Path(storage).resolve()) if local else storage,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.train.keep_checkpoints, checkpoint_score_attribute="val/score",
                checkpoint_score_order="max"),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            logging_config=ray.train.LoggingConfig(log_level=cfg.train.log_level),
        ),
        datasets={"train": train_ds, "val": val_ds},
        # Training data is split equally (DDP needs the same number of steps on every rank);
        # validation is read whole by each worker, which predicts its share (see the loop).
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    announce(f"training {cfg.model.variant} on {cfg.train.workers} worker(s) "
             f"({'GPU' if placement.use_gpu else 'CPU'}, {placement.cpus_per_worker:g} CPU and "
             f"{placement.threads_per_worker} thread(s) each): {len(train_ids)} training, {len(val_ids)} "
             f"validation subjects, {steps_per_epoch} steps per epoch")
    result = trainer.fit()
    scored = [(c, m) for c, m in result.best_checkpoints if not math.isnan(m.get("val/score", math.nan))]
    if not scored:
        scored = result.best_checkpoints[-1:]
    checkpoint, metrics = max(scored, key=lambda cm: cm[1].get("val/score", -math.inf))
    best_dir = run_dir / BEST_DIR
    best_dir.parent.mkdir(parents=True, exist_ok=True)
    with checkpoint.as_directory() as folder:
        export_checkpoint(Path(folder), best_dir)
    return TrainResult(run_dir=run_dir, best_dir=best_dir, metrics=metrics, final_metrics=result.metrics or {})
