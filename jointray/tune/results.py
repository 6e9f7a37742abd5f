"""What a search leaves behind: the results table, the Pareto front, a plot, the best config and checkpoint.

Written into the search folder by :func:`summarize`:

- ``results.parquet`` and ``results.csv``: one row per trial: ``trial_id``, ``status`` (``COMPLETE``:
  trained to its end; ``STOPPED``: stopped early by ASHA; ``ERROR``: failed, ``error`` says why),
  the parameters (``param/<key>``), the metrics of the trial's best checkpoint (of its last epoch for a
  stopped or failed trial), ``epochs`` trained, ``best_epoch`` (0-based; finished trials),
  ``start``/``end`` (Unix time), ``time_s``,
  ``attempts`` (how often the trial was started: 2 after a resume continued it),
  ``resumed_from_epoch`` (the checkpoint its last attempt continued from; -1: from scratch), ``pareto``
  and ``checkpoint``.
- ``pareto.png`` (two or more objectives: the first two, the front highlighted) or ``history.png``
  (one objective: each trial's value and the best so far).
- ``best_config.yaml``: the best trial's whole config, which ``jointray train --config`` takes as it is.
- ``best/``: the best trial's best checkpoint, verified, in the format the server loads.

The best trial: with one objective, the best value; with several, the Pareto-optimal trial with the
best first objective. The front is Optuna's (``study.best_trials``) for an Optuna search and is
computed from the table for a grid.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import optuna
import pandas as pd
import yaml

from jointray.artifacts import export_checkpoint, read_config
from jointray.config import Config
from jointray.storage import Storage

# The search folder's layout (jointray.tune.search documents it).
STUDY_DB = "optuna.db"
TRIALS_DIR = "trials"
ATTEMPTS_FILE = "attempts.jsonl"  # in each trial's run folder

matplotlib.use("Agg")  # files only: no display on a cluster node
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

RESULTS = "results"
BEST_DIR = "best"
BEST_CONFIG = "best_config.yaml"
BEST_TRIAL = "best_trial.json"
#: What :func:`summarize` writes (a search at a URI uploads these from the driver's mirror).
RESULT_FILES = (STUDY_DB, f"{RESULTS}.parquet", f"{RESULTS}.csv", "pareto.png", "history.png", BEST_CONFIG,
                BEST_TRIAL, BEST_DIR)


@dataclass
class ResultsSummary:
    """A finished search: ``folder`` holds its files on this machine; ``where`` is the search folder as the
    user names it (the same folder, or the storage URI the files were uploaded to)."""

    folder: Path
    table: pd.DataFrame
    objectives: dict[str, str]
    best_trial: str | None
    best_dir: Path | None
    best_config: Path | None
    plot: Path | None
    where: Path | str


def dominates(a: np.ndarray, b: np.ndarray, signs: np.ndarray) -> bool:
    """Whether objective vector ``a`` Pareto-dominates ``b`` (``signs``: +1 maximised, -1 minimised)."""
    a, b = a * signs, b * signs
    return bool(np.all(a >= b) and np.any(a > b))


def pareto_front(table: pd.DataFrame, objectives: dict[str, str]) -> list[str]:
    """The ``trial_id`` s of the complete trials that no other complete trial dominates."""
    done = table[(table["status"] == "COMPLETE") & table[list(objectives)].notna().all(axis=1)]
    values = done[list(objectives)].to_numpy(dtype=np.float64)
    signs = np.array([1.0 if mode == "max" else -1.0 for mode in objectives.values()])
    return [tid for i, tid in enumerate(done["trial_id"])
            if not any(dominates(values[j], values[i], signs) for j in range(len(done)) if j != i)]


def _reason(trial) -> str:
    """The last line of a failed trial's error: the exception a user can act on, not Ray's wrapping."""
    error = trial.get_pickled_error() if trial.status == "ERROR" else None
    if error is None:
        return "failed (no error recorded)" if trial.status == "ERROR" else ""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _attempts(trials: Storage, trial_id: str) -> int:
    path = trials.path(trial_id, ATTEMPTS_FILE)
    return len(trials.read_text(path).splitlines()) if trials.exists(path) else 0


def results_table(trials, trials_dir: Storage) -> pd.DataFrame:
    """One row per Tune trial (``ray.tune.ExperimentAnalysis(...).trials``); ``trials_dir``: the search's
    trials folder."""
    rows = []
    for trial in trials:
        metrics = dict(trial.last_result or {})
        status = "ERROR" if trial.status == "ERROR" else ("COMPLETE" if metrics.get("final") else "STOPPED")
        end = float(metrics.get("timestamp", math.nan))
        rows.append({
            "trial_id": trial.trial_id, "status": status, "error": _reason(trial),
            **{f"param/{k}": v for k, v in sorted(trial.config.items())},
            **{k: float(v) for k, v in sorted(metrics.items())
               if k.startswith(("val/", "train/", "weight/", "worker/")) and isinstance(v, (int, float))},
            # A finished trial's last report carries its best checkpoint's metrics, "epoch" the best one's;
            # a stopped trial's is its last epoch's.
            "epochs": float(metrics.get("epochs_trained", float(metrics.get("epoch", math.nan)) + 1)),
            "best_epoch": float(metrics.get("best_epoch", math.nan)),
            "start": end - float(metrics.get("time_total_s", math.nan)), "end": end,
            "time_s": float(metrics.get("time_total_s", math.nan)),
            "attempts": _attempts(trials_dir, trial.trial_id),
            "resumed_from_epoch": float(metrics.get("resumed_from_epoch", math.nan)),
            "checkpoint": metrics.get("checkpoint_path", "") if metrics.get("final") else "",
        })
    return pd.DataFrame(rows).sort_values("trial_id", kind="stable").reset_index(drop=True)


def optuna_front(table: pd.DataFrame, objectives: dict[str, str], storage: str, study_name: str) -> list[str]:
    """The trials of Optuna's Pareto front (``study.best_trials``; one objective: ``best_trial``), found in
    the table by their objective values, which Optuna was told from the same final reports."""
    study = optuna.load_study(study_name=study_name, storage=storage)
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not finished:
        return []
    best = study.best_trials if len(objectives) > 1 else [study.best_trial]
    wanted = {tuple(t.values) for t in best}
    done = table[table["status"] == "COMPLETE"]
    return [tid for tid, values in zip(done["trial_id"], done[list(objectives)].itertuples(index=False))
            if tuple(float(v) for v in values) in wanted]


def _plot(table: pd.DataFrame, objectives: dict[str, str], front: list[str], folder: Path) -> Path | None:
    done = table[table["status"] == "COMPLETE"]
    if done.empty:
        return None
    names = list(objectives)
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    if len(names) >= 2:
        x, y = names[:2]
        on = done["trial_id"].isin(front)
        ax.scatter(done.loc[~on, x], done.loc[~on, y], c="0.6", label="trial")
        edge = done[on].sort_values(x)
        ax.plot(edge[x], edge[y], "o-", c="tab:red", label="Pareto front")
        ax.set_xlabel(f"{x} ({objectives[x]})")
        ax.set_ylabel(f"{y} ({objectives[y]})")
        path = folder / "pareto.png"
    else:
        (name, mode), = objectives.items()
        ordered = done.sort_values("end")
        values = ordered[name].to_numpy(dtype=np.float64)
        best = np.fmax.accumulate(values) if mode == "max" else np.fmin.accumulate(values)
        ax.plot(range(1, len(values) + 1), values, "o", c="0.5", label="trial")
        ax.step(range(1, len(values) + 1), best, where="post", c="tab:red", label="best so far")
        ax.set_xlabel("trial (in order of completion)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # trials are counted, not measured
        ax.set_ylabel(f"{name} ({mode})")
        path = folder / "history.png"
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _best_config(cfg: Config, trial_cfg_tree: dict[str, Any], folder: Path) -> Path:
    """The winning trial's config for ``jointray train``: its own run name, the search's storage."""
    tree = dict(trial_cfg_tree)
    tree["train"] = dict(tree["train"], name=f"{cfg.tune.name}-best", storage_path=cfg.train.storage_path,
                         resume=False)
    path = folder / BEST_CONFIG
    path.write_text(f"# The best trial of the search {cfg.tune.name} ({folder}).\n"
                    + yaml.safe_dump(tree, sort_keys=False))
    return path


def summarize(cfg: Config, folder: Path, where: Path | str, trials_dir: Storage, trials,
              study_name: str | None) -> ResultsSummary:
    """Write the table, the plot, the best config and the best checkpoint of a finished search.

    Args:
        cfg: the search's config.
        folder: the search folder on this machine (a remote search's mirror).
        where: the search folder as the user names it (``folder``, or its storage URI).
        trials_dir: the search's trials folder, where each trial's run lies.
        trials: Tune's trials (``ray.tune.ExperimentAnalysis(<search>/tune).trials``).
        study_name: the Optuna study's name; None for a grid search.
    """
    objectives = dict(cfg.tune.objectives)
    table = results_table(trials, trials_dir)
    for name in objectives:
        if name not in table:
            table[name] = math.nan
    if study_name is not None:
        front = optuna_front(table, objectives, f"sqlite:///{folder / STUDY_DB}", study_name)
    else:
        front = pareto_front(table, objectives)
    table["pareto"] = table["trial_id"].isin(front)
    table.to_parquet(folder / f"{RESULTS}.parquet", index=False)
    table.to_csv(folder / f"{RESULTS}.csv", index=False)
    plot = _plot(table, objectives, front, folder)
    best_trial = best_dir = best_config = None
    if front:
        (first, mode), = list(objectives.items())[:1]
        candidates = table[table["trial_id"].isin(front)]
        row = candidates.loc[candidates[first].idxmax() if mode == "max" else candidates[first].idxmin()]
        best_trial = str(row["trial_id"])
        source = trials_dir.path(best_trial, BEST_DIR)  # the trial's run exported its best checkpoint there
        if trials_dir.local:
            export_checkpoint(Path(source), folder / BEST_DIR)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                trials_dir.download(source, Path(tmp) / BEST_DIR)
                export_checkpoint(Path(tmp) / BEST_DIR, folder / BEST_DIR)
        best_dir = folder / BEST_DIR
        trial_cfg = read_config(best_dir)
        best_config = _best_config(cfg, trial_cfg.model_dump(mode="json", exclude={"tune"}), folder)
        (folder / BEST_TRIAL).write_text(json.dumps({"trial_id": best_trial, "objectives": {
            k: float(row[k]) for k in objectives}}, indent=2) + "\n")
    return ResultsSummary(folder=folder, table=table, objectives=objectives, best_trial=best_trial,
                          best_dir=best_dir, best_config=best_config, plot=plot, where=where)
