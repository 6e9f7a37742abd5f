"""A hyperparameter search on Ray Tune: one trial = one ``jointray train`` run, searched with Optuna.

Ray 2.60's Train V2 does not take a ``TorchTrainer`` as a Tune trainable. Each trial is a function
(:func:`run_trial`) that builds its config from the base config and the trial's parameters, runs
:func:`jointray.train.trainer.run_training` — the code path of ``jointray train`` — and passes every
epoch's metrics to Tune through Ray Train's ``TuneReportCallback``, then reports once more with the
metrics of the run's best checkpoint (its exported ``best/`` folder in ``checkpoint_path``). That last
report is what the searcher learns from and what the results table shows; the epoch reports drive
ASHA.

Layout of ``<tune.storage_path>/<tune.name>/``::

    search.yaml          the whole config of the search (``--resume`` reads it, not the user's file)
    search.json          the Optuna study's name and when the search started
    optuna.db            the Optuna study (SQLite): ``optuna-dashboard sqlite:///<folder>/optuna.db``
    tune/                Ray Tune's experiment state (what ``Tuner.restore`` continues)
    trials/<trial_id>/   each trial's training run: checkpoints, best/, TensorBoard, attempts.jsonl
    results.parquet, results.csv, pareto.png or history.png, best_config.yaml, best/   (see results.py)

Resources: each trial holds ``tune.driver_cpus`` for its driver (it only waits on Ray Train); its
trainer's workers and data take the trial's share of the CPUs (``tune.trial_cpus``, by default the
cluster's CPUs shared equally by ``max_concurrent_trials``), and each worker runs as many threads as
it holds CPUs, so concurrent trials do not oversubscribe the machine.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import uuid
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import optuna
import ray
import ray.tune
import yaml
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from jointray.config import Config, ConfigError, config_from_tree, override_text
from jointray.train.trainer import prepared_folder, run_training
from jointray.tune.results import STUDY_DB, TRIALS_DIR, ResultsSummary, summarize
from jointray.tune.space import encode_point, trial_config, tune_space

SEARCH_CONFIG = "search.yaml"
SEARCH_STATE = "search.json"
TUNE_DIR = "tune"
ATTEMPTS_FILE = "attempts.jsonl"
#: ASHA's max_t for a trial that a time budget ends: more epochs than any budget holds.
UNBOUNDED_EPOCHS = 10**6


@dataclass
class Concurrency:
    trials: int  # at once
    cpus_per_trial: float  # for the trainer's workers and its data tasks


def plan_concurrency(cfg: Config) -> Concurrency:
    """How many trials run at once and the CPUs each may take; a :class:`ConfigError` when one trial
    cannot fit the cluster (Tune would wait for it forever)."""
    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    t, workers = cfg.tune, cfg.train.workers
    use_gpu = cfg.train.use_gpu if cfg.train.use_gpu is not None else gpus >= workers
    if t.max_concurrent_trials:
        trials = t.max_concurrent_trials
    elif t.trial_cpus:
        trials = max(1, int((cpus + 1e-9) // (t.trial_cpus + t.driver_cpus)))
    else:  # one CPU (or GPU) per worker at the least
        trials = max(1, int((gpus if use_gpu else cpus) // workers))
    share = t.trial_cpus or (cpus - trials * t.driver_cpus) / trials
    if share + t.driver_cpus > cpus:
        raise ConfigError(f"tune.trial_cpus={share:g} (+ driver {t.driver_cpus:g}) is more than the {cpus:g} CPUs "
                          f"of this Ray cluster")
    return Concurrency(trials=trials, cpus_per_trial=share)


def run_trial(params: dict[str, Any], *, base: str, folder: str, cpus: float) -> None:
    """One trial: train the base config with ``params`` applied, report each epoch and then the best.

    Args:
        params: the trial's sampled values, keyed by config key (Tune's ``config``).
        base: the search's config as JSON.
        folder: the search folder.
        cpus: the CPUs this trial's trainer may take.
    """
    trial_id = ray.tune.get_context().get_trial_id()
    trials = Path(folder) / TRIALS_DIR
    cfg = trial_config(Config.model_validate_json(base), params, trials, trial_id)
    run_dir = trials / trial_id
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / ATTEMPTS_FILE).open("a") as f:  # a resumed search must not re-run finished trials: counted
        f.write(json.dumps({"started": time.time()}) + "\n")
    result = run_training(cfg, announce=lambda line: print(f"[{trial_id}] {line}", flush=True), cpus=cpus,
                          callbacks=[TuneReportCallback()])
    numbers = {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))}
    trained = float(result.final_metrics.get("epoch", math.nan)) + 1  # the last epoch's, not the best's
    ray.tune.report(numbers | {"best_epoch": numbers.get("epoch", math.nan), "epochs_trained": trained,
                               "final": 1.0, "checkpoint_path": str(result.best_dir)})


class EpochLines(ray.tune.Callback):
    """One console line per trial event: each epoch's objectives, completion, failure."""

    def __init__(self, objectives: list[str], epochs: int | None):
        self.objectives, self.of = objectives, f"/{epochs}" if epochs is not None else ""

    def _values(self, result: dict[str, Any]) -> str:
        return " ".join(f"{k.removeprefix('val/')} {result[k]:.4g}" for k in self.objectives
                        if isinstance(result.get(k), (int, float)))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if not result.get("final"):
            print(f"trial {trial.trial_id} epoch {int(result.get('epoch', -1)) + 1}{self.of} "
                  f"{self._values(result)}", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        what = "done" if last.get("final") else "stopped early"
        print(f"trial {trial.trial_id} {what}: {self._values(last)}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"trial {trial.trial_id} FAILED (see the results table for why)", flush=True)


def _searcher(cfg: Config, folder: Path, study_name: str) -> OptunaSearch | None:
    t = cfg.tune
    if t.searcher == "grid":
        return None  # Tune's own variant generator walks the grid
    metrics, modes = list(t.objectives), list(t.objectives.values())
    # Optuna's own storage, in the search folder, under a name of its own: optuna-dashboard opens it,
    # and a second search in another folder never loads this study.
    storage = optuna.storages.RDBStorage(f"sqlite:///{folder / STUDY_DB}")
    return OptunaSearch(
        metric=metrics if len(metrics) > 1 else metrics[0], mode=modes if len(modes) > 1 else modes[0],
        points_to_evaluate=[encode_point(t.space, p) for p in t.points_to_evaluate] or None,
        study_name=study_name, storage=storage, seed=t.seed,
    )


def _trainable(cfg: Config, folder: Path, concurrency: Concurrency):
    """:func:`run_trial` bound to this search, holding only its driver's share of a CPU (the trainer's
    workers get theirs from Ray Train)."""
    return ray.tune.with_resources(
        partial(run_trial, base=cfg.model_dump_json(), folder=str(folder), cpus=concurrency.cpus_per_trial),
        {"CPU": cfg.tune.driver_cpus})


def _scheduler(cfg: Config) -> ASHAScheduler | None:
    t = cfg.tune
    if t.scheduler != "asha":
        return None
    (metric, mode), = t.objectives.items()
    # +1: the trial's last report (the best checkpoint's metrics) comes after its last epoch. Under a time
    # budget the epochs are not known in advance, and ASHA must not cut a trial before its schedule ends.
    epochs = cfg.train.planned_epochs
    max_t = epochs + 1 if epochs is not None else UNBOUNDED_EPOCHS
    return ASHAScheduler(time_attr="training_iteration", metric=metric, mode=mode, max_t=max_t,
                         grace_period=t.grace_epochs, reduction_factor=t.reduction_factor)


def _tuner(cfg: Config, folder: Path, study_name: str, concurrency: Concurrency) -> ray.tune.Tuner:
    t = cfg.tune
    return ray.tune.Tuner(
        _trainable(cfg, folder, concurrency),
        param_space=tune_space(t.space),
        tune_config=ray.tune.TuneConfig(search_alg=_searcher(cfg, folder, study_name), scheduler=_scheduler(cfg),
                                        num_samples=t.num_samples, max_concurrent_trials=concurrency.trials),
        run_config=_run_config(cfg, folder),
    )


def _run_config(cfg: Config, folder: Path) -> ray.tune.RunConfig:
    return ray.tune.RunConfig(
        name=TUNE_DIR, storage_path=str(folder),
        # A failed trial is recorded as failed and the search goes on; retrying it would fail the same way.
        failure_config=ray.tune.FailureConfig(max_failures=0),
        callbacks=[EpochLines(list(cfg.tune.objectives), cfg.train.planned_epochs)], verbose=0,
    )


def search_folder(cfg: Config) -> Path:
    return Path(cfg.tune.storage_path).resolve() / cfg.tune.name


def load_search(folder: str | Path) -> Config:
    """The config a search in ``folder`` was started with (what ``--resume`` continues)."""
    path = Path(folder) / SEARCH_CONFIG
    if not path.is_file():
        raise ConfigError(f"{folder} holds no search to resume ({SEARCH_CONFIG} is missing)")
    return config_from_tree(yaml.safe_load(path.read_text()))


def with_absolute_paths(cfg: Config) -> Config:
    """``cfg`` with its local paths made absolute: Tune runs each trial in a working folder of its own."""
    local = {"data.root": cfg.data.root, "data.output": cfg.data.output, "data.clinical": cfg.data.clinical,
             "train.prepared": cfg.train.prepared, "train.storage_path": cfg.train.storage_path,
             "tune.storage_path": cfg.tune.storage_path}
    overrides = [override_text(key, str(Path(value).resolve())) for key, value in local.items()
                 if value is not None and "://" not in str(value)]
    return config_from_tree(cfg.model_dump(mode="json"), overrides)


def run_search(cfg: Config, resume: bool = False) -> ResultsSummary:
    """Run (or, with ``resume``, continue) the search ``cfg.tune`` over ``cfg`` on the connected cluster.

    A fresh search refuses a folder that already holds one (resume it, or choose another
    ``tune.name``): hours of trials are not replaced by a typo. Returns the written results.
    """
    if not cfg.tune.space:
        raise ConfigError("tune.space is empty: name at least one config key to search (see configs/tune_synthetic.yaml)")
    cfg = with_absolute_paths(cfg)
    prepared_folder(cfg)  # shards missing or stale: say so before any trial starts
    folder = search_folder(cfg)
    concurrency = plan_concurrency(cfg)
    if resume:
        state = json.loads((folder / SEARCH_STATE).read_text())
        if not ray.tune.Tuner.can_restore(str(folder / TUNE_DIR)):
            raise ConfigError(f"{folder / TUNE_DIR} holds no Tune experiment to restore")
        # Trials that were running when the driver died continue from their own training checkpoints
        # (their run folders are resumable). resume_errored: a failed trial is tried once more, which a
        # transient failure (a lost node) deserves; a deterministic one fails again and is recorded again.
        tuner = ray.tune.Tuner.restore(str(folder / TUNE_DIR), _trainable(cfg, folder, concurrency),
                                       resume_errored=True, param_space=tune_space(cfg.tune.space))
        print(f"resuming the search in {folder}", flush=True)
    else:
        if folder.exists():
            raise ConfigError(f"{folder} already holds a search: continue it with `jointray tune --resume {folder}`, "
                              f"or choose another tune.name")
        folder.mkdir(parents=True)
        (folder / SEARCH_CONFIG).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        state = {"study_name": f"{cfg.tune.name}-{uuid.uuid4().hex[:8]}", "started": time.time()}
        (folder / SEARCH_STATE).write_text(json.dumps(state, indent=2) + "\n")
        tuner = _tuner(cfg, folder, state["study_name"], concurrency)
        print(f"searching {len(cfg.tune.space)} parameter(s) over {cfg.tune.num_samples} "
              f"{'trial(s)' if cfg.tune.searcher == 'optuna' else 'repeat(s) of the grid'}, "
              f"{concurrency.trials} at a time with {concurrency.cpus_per_trial:.2f} CPUs each: {folder}", flush=True)
    tuner.fit()
    trials = ray.tune.ExperimentAnalysis(str(folder / TUNE_DIR)).trials
    return summarize(cfg, folder, trials, state["study_name"] if cfg.tune.searcher == "optuna" else None)


def remove_search(folder: Path) -> None:
    """Delete a search folder (the demo starts its search afresh each time)."""
    if (folder / SEARCH_CONFIG).is_file():
        shutil.rmtree(folder)
