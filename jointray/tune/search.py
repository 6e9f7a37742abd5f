"""A hyperparameter search on Ray Tune: one trial = one ``jointray train`` run, searched with Optuna.

Ray 2.60's Train V2 does not take a ``TorchTrainer`` as a Tune trainable. Each trial is a function
(:func:`run_trial`) that builds its config from the base config and the trial's parameters, runs
:func:`jointray.train.trainer.run_training` — the code path of ``jointray train`` — and passes every
epoch's metrics to Tune through Ray Train's ``TuneReportCallback``, then reports once more with the
metrics of the run's best checkpoint (its exported ``best/`` folder in ``checkpoint_path``). That last
report is what the searcher learns from and what the results table shows; the epoch reports drive
ASHA.

Layout of ``<tune.storage_path>/<tune.name>/`` (a local folder or a storage URI: see :class:`SearchPlace`)::

    search.yaml          the whole config of the search (``--resume`` reads it, not the user's file)
    search.json          the Optuna study's name and when the search started
    optuna.db            the Optuna study (SQLite): ``optuna-dashboard sqlite:///<folder>/optuna.db``
    tune/                Ray Tune's experiment state (what ``Tuner.restore`` continues)
    trials/<trial_id>/   each trial's training run: checkpoints, best/, TensorBoard, attempts.jsonl
    results.parquet, results.csv, pareto.png or history.png, best_config.yaml, best/   (see results.py)

A search at a URI (``tune.storage_path=s3://bucket/searches``) keeps Tune's experiment and the trials' runs
there, written by whichever node runs them; the driver works on a local mirror of the files it writes
(search.yaml, search.json, optuna.db, the results) and uploads them when the search starts, after each
finished trial and at the end. ``--resume <URI>`` downloads them again and restores Tune's experiment
from the store (the tests kill and resume a local search; a remote one is run, not resumed).

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
import pyarrow.fs as pafs
import ray
import ray.tune
import yaml
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from jointray.config import Config, ConfigError, config_from_tree, override_text
from jointray.storage import Storage, mirror_folder
from jointray.train.trainer import prepared_folder, run_training
from jointray.tune.results import ATTEMPTS_FILE, RESULT_FILES, STUDY_DB, TRIALS_DIR, ResultsSummary, summarize
from jointray.tune.space import encode_point, trial_config, tune_space

SEARCH_CONFIG = "search.yaml"
SEARCH_STATE = "search.json"
TUNE_DIR = "tune"
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


@dataclass
class SearchPlace:
    """Where a search lives: ``storage``, the search folder ``<tune.storage_path>/<tune.name>`` on its
    filesystem, and ``local``, the driver's folder — the search folder itself when it is local, a mirror of
    the driver's files (:func:`jointray.storage.mirror_folder`) when it is at a URI."""

    storage: Storage
    local: Path

    @classmethod
    def of(cls, location: str) -> SearchPlace:
        storage = Storage.of(location)
        return cls(storage, Path(storage.base) if storage.local else mirror_folder(location))

    @property
    def filesystem(self) -> pafs.FileSystem | None:
        """For Tune's ``storage_filesystem``: None for a local folder (Tune's default)."""
        return None if self.storage.local else self.storage.fs

    def push(self, *names: str) -> None:
        """Upload the driver's files ``names`` (files or folders, replaced whole) to a remote search folder."""
        if self.storage.local:
            return
        for name in names:
            if (self.local / name).exists():
                if (self.local / name).is_dir() and self.storage.exists(self.storage.path(name)):
                    self.storage.fs.delete_dir(self.storage.path(name))
                self.storage.upload(self.local / name, self.storage.path(name))

    def pull(self, *names: str) -> None:
        """Download the driver's files ``names`` from a remote search folder into the mirror."""
        if self.storage.local:
            return
        for name in names:
            if self.storage.exists(self.storage.path(name)):
                self.storage.download(self.storage.path(name), self.local / name)


def run_trial(params: dict[str, Any], *, base: str, trials: str, cpus: float) -> None:
    """One trial: train the base config with ``params`` applied, report each epoch and then the best.

    Args:
        params: the trial's sampled values, keyed by config key (Tune's ``config``).
        base: the search's config as JSON.
        trials: the search's trials folder, a path or a storage URI (each trial's run is a folder in it).
        cpus: the CPUs this trial's trainer may take.
    """
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_config(Config.model_validate_json(base), params, trials, trial_id)
    storage = Storage.of(trials)
    # A resumed search must not re-run finished trials: each start is counted (read and rewritten whole,
    # as object stores do not append; one process runs a trial at a time).
    path = storage.path(trial_id, ATTEMPTS_FILE)
    storage.fs.create_dir(storage.path(trial_id), recursive=True)
    before = storage.read_text(path) if storage.exists(path) else ""
    storage.write_text(path, before + json.dumps({"started": time.time()}) + "\n")
    result = run_training(cfg, announce=lambda line: print(f"[{trial_id}] {line}", flush=True), cpus=cpus,
                          callbacks=[TuneReportCallback()])
    numbers = {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))}
    trained = float(result.final_metrics.get("epoch", math.nan)) + 1  # the last epoch's, not the best's
    ray.tune.report(numbers | {"best_epoch": numbers.get("epoch", math.nan), "epochs_trained": trained,
                               "final": 1.0, "checkpoint_path": str(result.best_dir)})


class PushStudy(ray.tune.Callback):
    """After each finished or failed trial, upload the Optuna study of a search at a URI."""

    def __init__(self, place: SearchPlace):
        self.place = place

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.place.push(STUDY_DB)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.place.push(STUDY_DB)


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


def _searcher(cfg: Config, place: SearchPlace, study_name: str) -> OptunaSearch | None:
    t = cfg.tune
    if t.searcher == "grid":
        return None  # Tune's own variant generator walks the grid
    metrics, modes = list(t.objectives), list(t.objectives.values())
    # Optuna's own storage, in the search folder, under a name of its own: optuna-dashboard opens it,
    # and a second search in another folder never loads this study.
    storage = optuna.storages.RDBStorage(f"sqlite:///{place.local / STUDY_DB}")
    return OptunaSearch(
        metric=metrics if len(metrics) > 1 else metrics[0], mode=modes if len(modes) > 1 else modes[0],
        points_to_evaluate=[encode_point(t.space, p) for p in t.points_to_evaluate] or None,
        study_name=study_name, storage=storage, seed=t.seed,
    )


def _trainable(cfg: Config, place: SearchPlace, concurrency: Concurrency):
    """:func:`run_trial` bound to this search, holding only its driver's share of a CPU (the trainer's
    workers get theirs from Ray Train)."""
    return ray.tune.with_resources(
        partial(run_trial, base=cfg.model_dump_json(), trials=place.storage.location(TRIALS_DIR),
                cpus=concurrency.cpus_per_trial),
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


def _tuner(cfg: Config, place: SearchPlace, study_name: str, concurrency: Concurrency) -> ray.tune.Tuner:
    t = cfg.tune
    return ray.tune.Tuner(
        _trainable(cfg, place, concurrency),
        param_space=tune_space(t.space),
        tune_config=ray.tune.TuneConfig(search_alg=_searcher(cfg, place, study_name), scheduler=_scheduler(cfg),
                                        num_samples=t.num_samples, max_concurrent_trials=concurrency.trials),
        run_config=_run_config(cfg, place),
    )


def _run_config(cfg: Config, place: SearchPlace) -> ray.tune.RunConfig:
    return ray.tune.RunConfig(
        name=TUNE_DIR, storage_path=place.storage.base, storage_filesystem=place.filesystem,
        # A failed trial is recorded as failed and the search goes on; retrying it would fail the same way.
        failure_config=ray.tune.FailureConfig(max_failures=0),
        callbacks=[EpochLines(list(cfg.tune.objectives), cfg.train.planned_epochs), PushStudy(place)], verbose=0,
    )


def search_folder(cfg: Config) -> str:
    """``<tune.storage_path>/<tune.name>``: a local path, or a URI with its options."""
    return Storage.of(cfg.tune.storage_path).location(cfg.tune.name)


def load_search(location: str | Path) -> Config:
    """The config a search at ``location`` (a folder or a storage URI) was started with (what ``--resume``
    continues)."""
    storage = Storage.of(location)
    path = storage.path(SEARCH_CONFIG)
    if not storage.exists(path):
        raise ConfigError(f"{storage.uri} holds no search to resume ({SEARCH_CONFIG} is missing)")
    return config_from_tree(yaml.safe_load(storage.read_text(path)))


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
        raise ConfigError("tune.space is empty: name at least one config key to search "
                          "(see configs/tune_synthetic.yaml)")
    cfg = with_absolute_paths(cfg)
    prepared_folder(cfg)  # shards missing or stale: say so before any trial starts
    place = SearchPlace.of(search_folder(cfg))
    storage, where = place.storage, place.storage.where()
    experiment = storage.path(TUNE_DIR)
    concurrency = plan_concurrency(cfg)
    if resume:
        place.pull(SEARCH_STATE, STUDY_DB)
        state = json.loads((place.local / SEARCH_STATE).read_text())
        if not ray.tune.Tuner.can_restore(experiment, storage_filesystem=place.filesystem):
            raise ConfigError(f"{storage.where(TUNE_DIR)} holds no Tune experiment to restore")
        # Trials that were running when the driver died continue from their own training checkpoints
        # (their run folders are resumable). resume_errored: a failed trial is tried once more, which a
        # transient failure (a lost node) deserves; a deterministic one fails again and is recorded again.
        tuner = ray.tune.Tuner.restore(experiment, _trainable(cfg, place, concurrency), resume_errored=True,
                                       param_space=tune_space(cfg.tune.space), storage_filesystem=place.filesystem)
        print(f"resuming the search in {where}", flush=True)
    else:
        if storage.exists(storage.base):
            raise ConfigError(f"{where} already holds a search: continue it with `jointray tune --resume {where}`, "
                              f"or choose another tune.name")
        if not storage.local:  # the mirror of an earlier search at this URI, since deleted there
            shutil.rmtree(place.local)
        place.local.mkdir(parents=True)
        (place.local / SEARCH_CONFIG).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        state = {"study_name": f"{cfg.tune.name}-{uuid.uuid4().hex[:8]}", "started": time.time()}
        (place.local / SEARCH_STATE).write_text(json.dumps(state, indent=2) + "\n")
        place.push(SEARCH_CONFIG, SEARCH_STATE)
        tuner = _tuner(cfg, place, state["study_name"], concurrency)
        print(f"searching {len(cfg.tune.space)} parameter(s) over {cfg.tune.num_samples} "
              f"{'trial(s)' if cfg.tune.searcher == 'optuna' else 'repeat(s) of the grid'}, "
              f"{concurrency.trials} at a time with {concurrency.cpus_per_trial:.2f} CPUs each: {where}", flush=True)
    tuner.fit()
    trials = ray.tune.ExperimentAnalysis(experiment, storage_filesystem=place.filesystem).trials
    summary = summarize(cfg, place.local, where, Storage.of(storage.location(TRIALS_DIR)), trials,
                        state["study_name"] if cfg.tune.searcher == "optuna" else None)
    place.push(*RESULT_FILES)
    return summary


def remove_search(location: str) -> None:
    """Delete a local search folder (the demo starts its search afresh each time)."""
    folder = Path(location)
    if (folder / SEARCH_CONFIG).is_file():
        shutil.rmtree(folder)
