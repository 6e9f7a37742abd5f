"""Hyperparameter search on Ray Tune + Optuna: a real multi-objective search with a failing trial and two
trials at once, and a search whose driver is killed with SIGKILL and resumed."""

import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import yaml

from jointray.config import ConfigError, load_config
from jointray.data.prepare import prepare_dataset
from jointray.tune import pareto_front, run_search

REPO = Path(__file__).resolve().parents[1]
#: 20 synthetic subjects (15 training: 4 steps an epoch at batch 4), a small v2: seconds per epoch.
BASE = ["data.format=synthetic", "data.synthetic.n_subjects=20", "preprocess.target_shape=[48,48,48]",
        "train.batch_size=4", "train.n_folds=4", "train.patience=null", "model.channels=[8,16,32,64]",
        "data.clinical_columns={age: numeric, sex: categorical, education_years: numeric, apoe4: numeric}",
        "train.workers=1",
        # The head refit (tests/test_refit.py, tests/test_train.py) would add a driver-side pass to every trial.
        "train.refit.enabled=false"]
SPACE = ('tune.space={"train.lr": {"loguniform": [3.0e-4, 3.0e-3]}, "model.dropout": {"uniform": [0.0, 0.3]}, '
         '"model.channels": {"choice": [[8, 16, 32, 64], [4, 8, 16, 32]]}}')


@pytest.fixture(scope="module")
def prepared(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    overrides = [*BASE, f"data.root={root / 'cohort'}", f"data.output={root / 'prepared'}"]
    assert prepare_dataset(load_config(None, overrides)).prepared == 20
    return root, overrides


@pytest.mark.parametrize(("override", "message"), [
    ('tune.space={"train.lrr": {"uniform": [0.1, 0.2]}}',
     r"(?s)tune.space.train.lrr = 0.1 makes an invalid trial.*train.lrr: unknown key"),
    ('tune.space={"train.lr": {"logunifrom": [0.1, 0.2]}}', r"tune.space.train.lr.logunifrom: unknown key"),
    ('tune.space={"model.dropout": {"uniform": [0.0, 1.5]}}', r"(?s)tune.space.model.dropout = 1.5 .*less than 1"),
    ('tune.space={"train.lr": {"loguniform": [0.0, 0.1]}}', r"loguniform bounds > 0"),
    ('tune.space={"train.lr": {"uniform": [0.1, 0.2], "choice": [0.1]}}', r"exactly one distribution"),
    ('tune.space={"model.channels": {"choice": [[8, 16, 32, 64], [8, 16]]}}', r"at least 3 levels"),
    ('tune.space={"model.cross_task": {"choice": [true]}}', None),  # v2 has both branches: a valid space
    ('tune.space={"train.lr": {"grid": [0.1, 0.2]}}', r"grid dimensions \['train.lr'\] need searcher: grid"),
    ("tune.objectives={val/dice: max, val/mmse_mae: min}", r"scheduler=asha takes one objective"),
    ('tune.points_to_evaluate=[{"train.lr": 0.001}]', r"gives every space key"),
])
def test_a_bad_search_space_fails_before_any_trial_naming_the_key(override, message):
    overrides = ['tune.space={"train.lr": {"loguniform": [0.0001, 0.01]}, "model.dropout": {"uniform": [0, 0.3]}}',
                 "tune.scheduler=asha", override]
    if message is None:
        assert load_config(None, overrides).tune.space
        return
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_a_config_extends_another_and_phase_learning_rates_follow_train_lr(tmp_path):
    """tune_synthetic.yaml is synthetic.yaml plus a search; a phase's rate is lr_scale × train.lr."""
    tuned, plain = load_config("tune_synthetic"), load_config("synthetic")
    assert tuned.data == plain.data and tuned.model == plain.model and tuned.train.balancer == plain.train.balancer
    assert (tuned.train.workers, tuned.train.epochs) == (1, 2) and tuned.tune.objectives == {"val/dice": "max",
                                                                                             "val/mmse_mae": "min"}
    loop = tmp_path / "a.yaml"
    loop.write_text(f"extends: {tmp_path / 'b.yaml'}\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(loop)


def _search(prepared, tmp_path, *extra):
    _, overrides = prepared
    return load_config(None, [*overrides, f"tune.storage_path={tmp_path}", "tune.name=search", SPACE, *extra])


def test_multi_objective_search_with_a_failing_trial_and_two_trials_at_once(prepared, tmp_path):
    """4 trials of 1 epoch, two at a time on the session's 2 CPUs; the first (a learning rate of 1e6) diverges.
    The search goes on; the table, the Pareto front, the best config and the best checkpoint agree."""
    from jointray.inference.predictor import Predictor

    cfg = _search(prepared, tmp_path, "train.epochs=1", "tune.num_samples=4", "tune.max_concurrent_trials=2",
                  "tune.objectives={val/dice: max, val/mmse_mae: min}", "tune.scheduler=none",
                  'tune.points_to_evaluate=[{"train.lr": 1000000.0, "model.dropout": 0.1, '
                  '"model.channels": [8, 16, 32, 64]}]')
    summary = run_search(cfg)
    folder = tmp_path / "search"
    table = pd.read_parquet(folder / "results.parquet")
    assert len(table) == 4 and len(pd.read_csv(folder / "results.csv")) == 4
    failed = table[table["status"] == "ERROR"]
    assert list(failed["param/train.lr"]) == [1e6], table[["trial_id", "status", "error"]]
    assert "TrainingDiverged" in failed["error"].iloc[0] and "non-finite" in failed["error"].iloc[0]
    done = table[table["status"] == "COMPLETE"]
    assert len(done) == 3 and done["val/dice"].notna().all() and done["val/mmse_mae"].notna().all()
    assert (done["epochs"] == 1).all() and (done["best_epoch"] == 0).all()
    # Pareto: Optuna's front is exactly the non-dominated complete trials of the table, and is non-empty.
    objectives = {"val/dice": "max", "val/mmse_mae": "min"}
    front = set(table.loc[table["pareto"], "trial_id"])
    assert front and front == set(pareto_front(table, objectives))
    signs = np.array([1.0, -1.0])
    values = {row.trial_id: np.array([row["val/dice"], row["val/mmse_mae"]]) for _, row in done.iterrows()}
    for a in front:
        assert not any(np.all(values[b] * signs >= values[a] * signs) and np.any(values[b] * signs > values[a] * signs)
                       for b in values if b != a)
    for b in set(values) - front:  # every other trial is dominated by a front member
        assert any(np.all(values[a] * signs >= values[b] * signs) for a in front)
    # The study is Optuna's own, under this search's name: 4 trials, the diverged one FAIL.
    study_name = json.loads((folder / "search.json").read_text())["study_name"]
    study = optuna.load_study(study_name=study_name, storage=f"sqlite:///{folder / 'optuna.db'}")
    states = sorted(t.state.name for t in study.trials)
    assert states == ["COMPLETE", "COMPLETE", "COMPLETE", "FAIL"]
    assert {tuple(t.values) for t in study.best_trials} == {tuple(values[a]) for a in front}
    # Two trials at once, each on its own share: one thread and under half the CPUs each.
    spans = sorted(zip(table["start"], table["end"]))
    assert any(s2 < e1 for (_, e1), (s2, _) in itertools.pairwise(spans)), spans
    assert (table["worker/threads"] == 1).all() and (table["worker/cpus"] < 1.0).all()
    # The best: the front's highest Dice; its config trains as it is; its checkpoint predicts.
    best = done.loc[done["trial_id"].isin(front), "val/dice"].idxmax()
    assert summary.best_trial == table.loc[best, "trial_id"] and (folder / "pareto.png").stat().st_size > 0
    trained = load_config(folder / "best_config.yaml")
    assert trained.train.lr == table.loc[best, "param/train.lr"] and "tune" not in yaml.safe_load(
        (folder / "best_config.yaml").read_text())
    assert list(trained.model.channels) == json.loads(table.loc[best, "param/model.channels"])
    root, _ = prepared
    row = pd.read_csv(root / "cohort" / "manifest.csv").iloc[0]
    predictor = Predictor(folder / "best", device="cpu")
    case = predictor.prepare(root / "cohort" / row["image"], {"age": float(row["age"])})
    prediction = predictor.finish(case, predictor.forward([case], 1, "heads")[0], 1, "heads")
    import nibabel as nib

    assert prediction.mask.shape == nib.load(root / "cohort" / row["image"]).shape
    assert math.isfinite(prediction.outcomes["pred_mmse"])
    with pytest.raises(ConfigError, match="already holds a search: continue it with `jointray tune --resume"):
        run_search(cfg)  # hours of trials are not replaced by a rerun


def _running_tune(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "jointray.cli", "tune", *args], cwd=REPO, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def test_a_search_whose_driver_is_killed_resumes_without_rerunning_finished_trials(prepared, tmp_path, ray_session):
    """SIGKILL the driver once a trial has finished and the next has a checkpoint; `--resume` finishes the
    search: 2 trials in all, the finished one started once, the interrupted one continued from its checkpoint."""
    config = tmp_path / "search.yaml"
    config.write_text(yaml.safe_dump(_search(prepared, tmp_path, "train.epochs=2", "tune.num_samples=2",
                                             "tune.max_concurrent_trials=1").model_dump(mode="json")))
    env = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address)
    folder = tmp_path / "search"
    killed = _running_tune(["--config", str(config)], env, tmp_path / "first.log")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and killed.poll() is None:
        finished = list(folder.glob("trials/*/best/meta.json"))
        # Ray Train's record of the run's checkpoints: what a restarted run continues from.
        midway = [t for t in folder.glob("trials/*")
                  if (t / "checkpoint_manager_snapshot.json").is_file() and not (t / "best").exists()]
        if finished and midway:
            break
        time.sleep(0.5)
    assert killed.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    before = {t.name for t in folder.glob("trials/*") if (t / "best" / "meta.json").is_file()}
    interrupted = {t.name for t in folder.glob("trials/*")} - before
    assert before and interrupted

    resumed = _running_tune(["--resume", str(folder)], env, tmp_path / "resumed.log")
    assert resumed.wait(timeout=600) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    table = pd.read_parquet(folder / "results.parquet")
    assert len(table) == 2 and (table["status"] == "COMPLETE").all(), table[["trial_id", "status", "error"]]
    attempts = dict(zip(table["trial_id"], table["attempts"]))
    resumed = dict(zip(table["trial_id"], table["resumed_from_epoch"]))
    assert all(attempts[t] == 1 and resumed[t] == -1 for t in before), (attempts, resumed)  # never re-run
    assert all(attempts[t] == 2 and resumed[t] == 0 for t in interrupted), (attempts, resumed)  # continued
    assert (folder / "best" / "meta.json").is_file() and (folder / "history.png").is_file()


def test_one_objective_uses_tpe_with_asha_and_several_use_no_scheduler(prepared, tmp_path):
    """The searcher and scheduler a search gets: ASHA counts the trial's last report (its best checkpoint's
    metrics) as one step past its epochs; a multi-objective search has no scheduler."""
    from ray.tune.schedulers import ASHAScheduler

    from jointray.tune.search import UNBOUNDED_EPOCHS, SearchPlace, _scheduler, _searcher

    cfg = _search(prepared, tmp_path, "train.epochs=7", "tune.scheduler=asha", "tune.grace_epochs=2")
    asha = _scheduler(cfg)
    assert isinstance(asha, ASHAScheduler)
    assert (asha._metric, asha._mode, asha._max_t) == ("val/score", "max", 8)
    assert [rung for rung, _ in asha._brackets[0]._rungs] == [6, 2]  # grace 2, × reduction factor 3
    # Under a time budget the epoch count does not end a trial, so ASHA must not either.
    budgeted = _scheduler(_search(prepared, tmp_path, "train.epochs=7", "tune.scheduler=asha", "train.max_minutes=5"))
    assert budgeted._max_t == UNBOUNDED_EPOCHS
    assert _searcher(cfg, SearchPlace.of(str(tmp_path)), "one").metric == "val/score"
    multi = _search(prepared, tmp_path, "tune.objectives={val/dice: max, val/mmse_mae: min}")
    assert _scheduler(multi) is None
    searcher = _searcher(multi, SearchPlace.of(str(tmp_path)), "two")
    assert (searcher.metric, searcher.mode) == (["val/dice", "val/mmse_mae"], ["max", "min"])
