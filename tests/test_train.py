"""Training on Ray Train: a real run, resume after a worker dies, checkpoints, and bad requests."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cohort_cfg

from jointray.artifacts import STATE_FILE, CheckpointError, export_checkpoint, read_checkpoint, write_checkpoint
from jointray.config import ConfigError, load_config
from jointray.data.streaming import split_subjects
from jointray.train.tracking import HISTORY_FILE, read_history
from jointray.train.trainer import FAULT_MARKER, plan_placement, run_training


def test_training_run_exports_a_verified_best_checkpoint(train_cohort, tmp_path):
    cfg = cohort_cfg(train_cohort, tmp_path, "train.name=basic", "train.epochs=2", "train.mlflow=true")
    result = run_training(cfg, announce=lambda _: None)
    assert result.best_dir == tmp_path / "basic" / "best"
    loaded = read_checkpoint(result.best_dir)
    assert loaded.config == cfg and loaded.spec == cfg.preprocess
    assert {f.name for f in loaded.schema.numeric} == {"age", "apoe4", "education_years"}
    assert [f.name for f in loaded.schema.categorical] == ["sex"]
    assert set(loaded.state) >= {"model", "optimizer", "balancer", "scaler", "epoch", "step", "rng"}
    for key in ("val/dice", "val/mmse_mae", "val/cdr_qwk", "val/c_index", "val/score", "cases_per_s"):
        assert key in result.metrics and math.isfinite(result.metrics[key]), key
    assert result.metrics["step"] == 4 * (result.metrics["epoch"] + 1)  # 15 subjects / batch 4 = 4 steps an epoch
    assert any((tmp_path / "basic" / "tensorboard").glob("events.out.tfevents.*"))
    # MLflow: the whole config as parameters, one value per epoch for every metric.
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'basic' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("jointray").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "basic"
    assert run.data.params["train.epochs"] == "2" and run.data.params["model.variant"] == "v2"
    history = client.get_metric_history(run.info.run_id, "val/dice")
    assert [m.step for m in history] == [0, 1]
    assert history[1].value == pytest.approx(result.final_metrics["val/dice"], abs=1e-6)
    assert loaded.trained_heads == ["mmse", "cdr", "risk"]  # every head saw targets in this cohort
    # The exported best checkpoint is its epoch's, with the outcome heads refit and nothing else changed.
    assert loaded.metrics == result.metrics
    source = read_checkpoint(tmp_path / "basic" / f"epoch_{int(result.metrics['epoch']):04d}")
    heads = {k for k in source.state["model"] if k.startswith("heads.")}
    assert heads and any(not torch.equal(loaded.state["model"][k], source.state["model"][k]) for k in heads)
    for key, tensor in source.state["model"].items():
        if key not in heads:
            torch.testing.assert_close(loaded.state["model"][key], tensor, rtol=0, atol=0, msg=key)
    for name in ("mmse", "cdr", "risk"):
        assert 0 <= result.metrics[f"refit/{name}_epoch"] <= cfg.train.refit.epochs
    assert result.metrics["prerefit/val/mmse_mae"] == source.metrics["val/mmse_mae"]
    assert result.metrics["val/dice"] == source.metrics["val/dice"]


def test_a_model_without_heads_is_left_as_trained_by_the_refit(tmp_path):
    """seg_only on data with outcome targets (its checkpoint lists them as trained heads): nothing to refit."""
    from jointray.data.clinical import ClinicalSchema
    from jointray.models import build_model
    from jointray.train.refit import refit_heads

    cfg = load_config(None, ["model.variant=seg_only", "model.channels=[8,16,32]"])
    folder = tmp_path / "best"
    write_checkpoint(folder, {"model": build_model(cfg.model).state_dict()}, cfg, cfg.preprocess, ClinicalSchema(),
                     {"val/dice": 0.5}, ["mmse", "cdr", "risk"])
    before = (folder / STATE_FILE).read_bytes()
    assert refit_heads(folder, train_ds=None, val_ds=None) is None  # returns before it reads any data
    assert (folder / STATE_FILE).read_bytes() == before


def test_heads_without_targets_take_no_part_in_the_loss_balancing(msd_checkpoint):
    """MSD has no outcome targets. Its v2 balances the segmentation loss alone: inverse_rate weighs one task 1.0
    at every epoch (with the three empty heads balanced beside it, the segmentation's weight jumped to 3.79
    after the warm-up, multiplying the gradient that train.grad_clip then clipped), and no loss of 0 is
    reported for a head that never saw a target."""
    history = read_history(Path(msd_checkpoint).parent / HISTORY_FILE)
    assert len(history) == 16
    for row in history:
        assert row["weight/seg"] == 1.0
        assert sorted(k for k in row if k.startswith(("weight/", "train/"))) == ["train/seg", "weight/seg"]
    assert read_checkpoint(msd_checkpoint).trained_heads == []


def test_trained_outcome_heads_are_reported_with_monte_carlo_intervals(train_cohort, one_epoch):
    import pandas as pd

    from jointray.inference.predictor import Predictor

    _, result = one_epoch
    root, _ = train_cohort
    row = pd.read_csv(root / "cohort" / "manifest.csv").iloc[0]
    predictor = Predictor(result.best_dir, device="cpu")
    case = predictor.prepare(root / "cohort" / row["image"], {"age": float(row["age"]), "sex": str(row["sex"])})
    prediction = predictor.finish(case, predictor.forward([case], 16, "heads")[0], 16, "heads")
    assert set(prediction.outcome_estimates) == {"mmse", "cdr", "risk"}
    for name in ("mmse", "risk"):
        estimate = prediction.outcome_estimates[name]
        assert estimate.std > 0 and estimate.interval[0] < estimate.mean < estimate.interval[1], name
    low, high = prediction.outcome_estimates["mmse"].interval
    assert 0 <= low <= high <= 30
    cdr = prediction.outcome_estimates["cdr"]
    assert list(cdr["probabilities"]) == ["0", "0.5", "1", "2"]
    assert sum(cdr["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert cdr["stage"] == prediction.outcomes["pred_cdr_stage"]


#: The only metrics two runs of one seed may disagree on: wall-clock figures (and the share of time spent
#: waiting for data), and which checkpoint the
#: run's last attempt started from (the crashed run resumed from epoch 0, the clean one from scratch).
UNCOMPARED = {"elapsed_s", "eta_s", "cases_per_s", "data_wait", "resumed_from_epoch"}


def _last_checkpoint(run: Path):
    return read_checkpoint(max(run.glob("epoch_*")))


def _same_metrics(a: dict[str, float], b: dict[str, float]) -> list[str]:
    """Names of the metrics that differ (NaN equals NaN), the UNCOMPARED ones left out."""
    keys = (set(a) | set(b)) - UNCOMPARED
    return sorted(k for k in keys if not (a.get(k) == b.get(k) or (math.isnan(a.get(k, 0.0)) and math.isnan(b.get(k, 0.0)))))


def _assert_resume_matches(train_cohort, tmp_path, *extra, fault_at: int, rtol=0.0):
    clean = run_training(cohort_cfg(train_cohort, tmp_path, "train.name=clean", *extra), announce=lambda _: None)
    faulty = run_training(cohort_cfg(train_cohort, tmp_path, "train.name=faulty", f"train.fault_at_step={fault_at}",
                                     *extra), announce=lambda _: None)
    assert (tmp_path / "faulty" / FAULT_MARKER).read_text() == f"fault injected at step {fault_at}\n"  # it died
    reference, resumed = _last_checkpoint(tmp_path / "clean"), _last_checkpoint(tmp_path / "faulty")
    assert (resumed.state["epoch"], resumed.state["step"]) == (reference.state["epoch"], reference.state["step"])
    for weights in ("model", "training_model"):  # the training model's own weights when "model" is their average
        for key, tensor in reference.state.get(weights, {}).items():
            torch.testing.assert_close(resumed.state[weights][key], tensor, rtol=rtol, atol=0.0, msg=key)
    moments = zip(reference.state["optimizer"]["state"].values(), resumed.state["optimizer"]["state"].values())
    for ref, res in moments:
        torch.testing.assert_close(res["exp_avg_sq"], ref["exp_avg_sq"], rtol=rtol, atol=0.0)
    return clean, faulty


@pytest.mark.parametrize("resident_mb", [2048, 0], ids=["shard in memory", "shard streamed every epoch"])
def test_a_resumed_run_ends_bit_identical_to_the_uninterrupted_run(train_cohort, tmp_path, resident_mb):
    # Augmentation, dropout and the shuffle (the resident shard's permutation, or the streaming shuffle
    # buffer) all draw random numbers: each must continue exactly.
    # 15 training subjects in batches of 4 = 4 steps an epoch. The crash comes at step 5, the first after
    # epoch 0's checkpoint was reported, sooner than Ray's controller polls for it: the run must still
    # restart from that checkpoint, not from scratch.
    # The weights' moving average (train.ema) is part of the state that must continue exactly.
    clean, faulty = _assert_resume_matches(train_cohort, tmp_path, "train.epochs=2", "train.augment.enabled=true",
                                           "train.augment.affine_prob=0.5", "train.ema=0.9",
                                           f"train.resident_mb={resident_mb}", fault_at=5)
    assert _same_metrics(clean.final_metrics, faulty.final_metrics) == []
    state = _last_checkpoint(tmp_path / "clean").state
    assert state["ema_updates"] == 8  # one update a step
    averaged, trained = state["model"], state["training_model"]
    assert not all(torch.equal(averaged[k], trained[k]) for k in trained if trained[k].is_floating_point())
    assert 0 <= clean.final_metrics["data_wait"] < 1
    assert (clean.final_metrics["resumed_from_epoch"], faulty.final_metrics["resumed_from_epoch"]) == (-1, 0)


def test_two_workers_resume_to_the_same_weights_validating_every_subject_once_with_identical_replicas(
        train_cohort, tmp_path):
    """Two workers, a crash at step 4 (the last step of epoch 1; 2 steps an epoch), resumed from epoch 0.

    Each rank restores its own generators and the data split is the same in both runs, so the weights end
    equal. Every epoch validates each of the 5 validation subjects once, and the ranks hold bit-identical
    weights and balancer state. deep_supervision=[1,0,0] leaves the coarse outputs out of the loss: DDP
    must not find their parameters unused. The uncertainty balancer learns weights outside DDP: they must
    agree too, and resume with the rest."""
    extra = ("train.epochs=2", "train.workers=2", "train.augment.enabled=true", "train.balancer.kind=uncertainty",
             "train.loss.deep_supervision=[1,0,0]")
    clean, faulty = _assert_resume_matches(train_cohort, tmp_path, *extra, fault_at=4, rtol=1e-6)
    assert clean.final_metrics["val/dice"] == pytest.approx(faulty.final_metrics["val/dice"], rel=1e-6)
    cfg = cohort_cfg(train_cohort, tmp_path)
    _, val_ids = split_subjects(cfg.train.prepared or cfg.data.output, cfg.train.n_folds, cfg.train.fold,
                                cfg.train.seed)
    for run in ("clean", "faulty"):
        for checkpoint in sorted((tmp_path / run).glob("epoch_*")):
            metrics = read_checkpoint(checkpoint).metrics
            assert metrics["val/cases"] == len(val_ids) == 5
            assert metrics["ddp/model_in_sync"] == 1.0 and metrics["ddp/balancer_in_sync"] == 1.0
    assert clean.final_metrics["step"] == 2 * 2  # ceil(15 / 2 workers / batch 4) = 2 steps an epoch


def test_the_wall_clock_budget_ends_an_all_cases_run_whose_last_checkpoint_is_exported(train_cohort, tmp_path):
    # With a budget, train.epochs no longer ends the run: one epoch takes a few seconds, and the run goes
    # on for the whole 15-second budget, then stops, still validated and saved.
    result = run_training(cohort_cfg(train_cohort, tmp_path, "train.name=budget", "train.epochs=1",
                                     "train.max_minutes=0.25", "train.fold=all"), announce=lambda _: None)
    assert result.final_metrics["stopped"] == 1.0 and result.final_metrics["epoch"] >= 1
    assert result.final_metrics["elapsed_s"] >= 15
    assert math.isfinite(result.final_metrics["val/dice"])
    last = read_checkpoint(max((tmp_path / "budget").glob("epoch_*"))).state
    assert last["epoch"] == result.final_metrics["epoch"]
    # nnU-Net's "all" fold: every subject trains; the last checkpoint is exported as trained, without
    # choosing by score or refitting the heads on training cases. Only that epoch is validated (on the
    # training cases, as its figures): scoring the others would choose nothing and cost training time.
    best = read_checkpoint(result.best_dir)
    assert best.state["epoch"] == last["epoch"] and result.metrics["val/cases"] == 20
    history = read_history(tmp_path / "budget" / HISTORY_FILE)
    assert [e["epoch"] for e in history] == list(range(int(last["epoch"]) + 1))
    assert ["val/dice" in e for e in history] == [False] * int(last["epoch"]) + [True]
    assert all("train/seg" in e for e in history)  # the learning curves are there for every epoch
    assert not any(k.startswith(("refit/", "prerefit/")) for k in best.metrics)
    # The budget, not the epoch count, set the schedule: the learning rate annealed to zero by its end.
    assert result.final_metrics["lr"] < 1e-5


def test_corrupt_or_half_written_checkpoints_are_never_loaded(one_epoch, tmp_path):
    _, result = one_epoch
    broken = tmp_path / "broken"
    shutil.copytree(result.best_dir, broken)
    with (broken / STATE_FILE).open("r+b") as f:
        f.seek(100)
        f.write(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="do not match the hash"):
        read_checkpoint(broken)
    (broken / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="not a complete jointray checkpoint"):
        read_checkpoint(broken)
    with pytest.raises(CheckpointError):
        export_checkpoint(broken, tmp_path / "never")
    assert not (tmp_path / "never").exists()
    state = torch.load(result.best_dir / STATE_FILE, weights_only=True)  # no pickled code needed
    assert state["epoch"] == 0


def test_bad_requests_fail_before_training(train_cohort, tmp_path):
    with pytest.raises(ConfigError, match=r"train.workers=3 is more than the 2 CPUs"):
        plan_placement(cohort_cfg(train_cohort, tmp_path, "train.workers=3"))
    with pytest.raises(ConfigError, match="no prepared shards at /nonexistent"):
        run_training(cohort_cfg(train_cohort, tmp_path, "train.prepared=/nonexistent"))
    with pytest.raises(ConfigError, match="fold=all validates on training cases"):
        cohort_cfg(train_cohort, tmp_path, "train.fold=all", "train.patience=5")
    with pytest.raises(ConfigError, match="train.balancer.kind: got 'magic'"):
        cohort_cfg(train_cohort, tmp_path, "train.balancer.kind=magic")
    with pytest.raises(ConfigError, match="prepare again with this config"):
        run_training(cohort_cfg(train_cohort, tmp_path, "preprocess.intensity.mode=percentile"))
    with pytest.raises(ConfigError, match="needs two views"):
        run_training(cohort_cfg(train_cohort, tmp_path, "model.variant=dv"))


def test_resuming_another_model_variant_is_refused(train_cohort, one_epoch):
    storage, _ = one_epoch
    with pytest.raises(ConfigError, match="holds a run of model v2 .* this config asks for dv1"):
        run_training(cohort_cfg(train_cohort, storage, "train.name=fold_0", "train.resume=true", "model.variant=dv1"))
    meta = json.loads(next((storage / "fold_0").glob("epoch_*/meta.json")).read_text())
    assert meta["config"]["model"]["variant"] == "v2"


def test_cross_validation_ensembles_its_folds_and_chooses_post_processing_out_of_fold(train_cohort, cross_validation,
                                                                                        tmp_path):
    """Each fold validated on its own quarter; the out-of-fold figures are each fold's checkpoint on its own
    validation cases (Dice as the Predictor scores them, with MONAI); the ensemble folder's probabilities are
    the folds' mean, and its post-processing is applied to the mask."""
    from jointray.artifacts import write_ensemble
    from jointray.data.sources import scan_source
    from jointray.inference.postprocess import keep_largest_component
    from jointray.inference.predictor import Predictor

    cfg, folds = cross_validation
    root, _ = train_cohort
    ensemble = Path(cfg.train.storage_path) / "cv"
    manifest = json.loads((ensemble / "ensemble.json").read_text())
    assert manifest["members"] == ["fold_0/best", "fold_1/best"]
    assert manifest["postprocess"]["largest_component"] == folds.largest_component
    records = {r.subject_id: r for r in scan_source(cfg.data).records}
    names = ("anterior", "posterior")
    dice = {name: [] for name in names}
    for k in (0, 1):
        _, val_ids = split_subjects(root / "prepared", 4, k, cfg.train.seed)
        assert folds.folds[k].metrics["val/cases"] == len(val_ids) == 5
        predictor = Predictor(folds.folds[k].best_dir, device="cpu")
        for subject in val_ids:
            scored = predictor.predict(records[subject]).metrics
            for name in names:
                dice[name].append(scored[f"dice/{name}"])
    oof = folds.out_of_fold
    assert oof["cases"] == 10
    for name in names:
        assert oof[f"dice_as_predicted/{name}"] == pytest.approx(np.mean(dice[name]), abs=1e-6), name
        kept = name in folds.largest_component
        assert kept == (oof[f"dice_largest_component/{name}"] > oof[f"dice_as_predicted/{name}"])
        assert oof[f"dice/{name}"] == oof[f"dice_largest_component/{name}" if kept else f"dice_as_predicted/{name}"]

    members = [Predictor(folds.folds[k].best_dir, device="cpu") for k in (0, 1)]
    both = Predictor(ensemble, device="cpu")
    assert both.version not in {m.version for m in members} and both.metrics["out_of_fold/cases"] == 10
    case = both.prepare(records[min(records)])
    mean = (members[0].forward([case])[0].probabilities + members[1].forward([case])[0].probabilities) / 2
    np.testing.assert_allclose(both.forward([case])[0].probabilities, mean, rtol=0, atol=1e-6)
    sampled = both.forward([case], 6, "full")[0]
    assert sampled.sample_volumes.shape == (6, 2) and sampled.outcome_samples["mmse"].shape == (6,)

    pooled = Predictor([folds.folds[0].best_dir, folds.folds[1].best_dir], device="cpu")
    plain = pooled.finish(case, pooled.forward([case])[0], 1, "heads").mask
    write_ensemble(tmp_path / "largest", [folds.folds[0].best_dir, folds.folds[1].best_dir], list(names))
    largest = Predictor(tmp_path / "largest", device="cpu")
    assert largest.largest_component == [1, 2]  # names → labels; what finish applies (test_inference)
    np.testing.assert_array_equal(largest.finish(case, largest.forward([case])[0], 1, "heads").mask,
                                  keep_largest_component(plain, [1, 2]))
