"""k-fold cross-validation in one command: the folds as separate Ray Train runs, then their ensemble.

``jointray train --all-folds`` (or ``train.folds: [0, 1, 2, 3, 4]``) trains each listed fold of
``train.n_folds`` as a run of its own, ``<storage_path>/<train.name>/fold_<k>`` (an ordinary run: its
best checkpoint in ``best/``, resumable with ``train.resume``), as many at a time as the cluster's CPUs
(or GPUs) fit — ``train.concurrent_folds`` caps it — each taking an equal share. Then, as nnU-Net does
(Isensee et al., Nature Methods 2021):

1. each fold's best checkpoint predicts its own validation cases from the source data, in each input's
   own space, with the inference settings of the config: the out-of-fold predictions, every case once;
2. keeping only the largest connected component of a structure is chosen on them
   (:mod:`jointray.inference.postprocess`);
3. ``<storage_path>/<train.name>/ensemble.json`` lists the folds' best checkpoints, the choice and the
   out-of-fold figures: that folder is a model that ``evaluate``, ``predict`` and ``serve`` take like a
   checkpoint, the folds' probabilities averaged.

The out-of-fold figures are optimistic, as any validation figure is: each fold's cases also chose that
fold's checkpoint. An honest estimate needs cases held out before all of this
(``benchmarks/accuracy_msd.py`` does that).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray

from jointray.artifacts import write_ensemble
from jointray.config import Config, ConfigError, config_from_tree
from jointray.data.errors import InputError
from jointray.data.sources import scan_source
from jointray.data.streaming import DATA_TASK_CPUS, split_subjects
from jointray.inference.postprocess import ComponentEvidence
from jointray.inference.predictor import Predictor
from jointray.storage import Storage
from jointray.train.trainer import TrainResult, prepared_folder, run_training


@dataclass
class CrossValidationResult:
    ensemble_dir: Path  # <storage_path>/<train.name>: the folds' runs and ensemble.json
    folds: dict[int, TrainResult]
    largest_component: list[str]
    out_of_fold: dict[str, float] = field(default_factory=dict)


def fold_config(cfg: Config, fold: int) -> Config:
    """The config of one fold's run: ``<storage_path>/<train.name>/fold_<k>``, validated on fold k."""
    return config_from_tree(cfg.model_dump(mode="json"), [
        f"train.storage_path={cfg.train.storage_path.rstrip('/')}/{cfg.train.name}", f"train.name=fold_{fold}",
        f"train.fold={fold}", "train.folds=null"])


def plan_folds(cfg: Config, folds: int) -> tuple[int, float | None]:
    """(folds trained at once, CPUs each may take — None: the whole cluster's). A fold needs its workers'
    CPUs (1 each unless ``train.cpus_per_worker`` says otherwise) and a data task's, or a GPU per worker."""
    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    workers = cfg.train.workers
    use_gpu = cfg.train.use_gpu if cfg.train.use_gpu is not None else gpus >= workers
    fit = gpus // workers if use_gpu else cpus // (workers * (cfg.train.cpus_per_worker or 1.0) + DATA_TASK_CPUS)
    at_once = max(1, min(folds, int(fit), cfg.train.concurrent_folds or folds))
    return at_once, (cpus / at_once if at_once > 1 else None)


@ray.remote(num_cpus=0, max_retries=0)
def _train_fold(config_json: str, cpus: float) -> TrainResult:
    """One fold's run as a Ray task (its driver only waits on Ray Train), so that folds train side by side."""
    cfg = Config.model_validate_json(config_json)
    return run_training(cfg, announce=lambda line: print(f"[{cfg.train.name}] {line}", flush=True), cpus=cpus)


def out_of_fold(cfg: Config, best: dict[int, Path], announce: Callable[[str], None]) -> ComponentEvidence:
    """Each fold's best checkpoint on its own validation cases, read from the source data: the evidence for
    post-processing (the masks before it, against the reference labels, on each input's grid)."""
    prepared = prepared_folder(cfg)
    records = {r.subject_id: r for r in scan_source(cfg.data).records}
    structures = {k: v for k, v in cfg.data.label_names.items() if k != 0}
    evidence = ComponentEvidence(structures)
    for fold, checkpoint in sorted(best.items()):
        predictor = Predictor(checkpoint, inference=cfg.inference)
        _, val_ids = split_subjects(prepared, cfg.train.n_folds, fold, cfg.train.seed)
        for subject in val_ids:
            if subject not in records or records[subject].label is None:
                announce(f"out-of-fold: {subject} of fold {fold} has no labelled source case; skipped")
                continue
            try:
                case = predictor.prepare(records[subject])
            except InputError as exc:
                announce(f"out-of-fold: {exc}; skipped")
                continue
            prediction = predictor.finish(case, predictor.forward([case])[0], 1, "heads")
            evidence.add(prediction.mask, case.label)
    return evidence


def run_cross_validation(cfg: Config, announce: Callable[[str], None] = print) -> CrossValidationResult:
    """Train ``cfg.train.folds`` and write their ensemble (see the module docstring); ``ray.init`` done by the
    caller."""
    folds = list(cfg.train.folds or range(cfg.train.n_folds))
    storage = Storage.of(cfg.train.storage_path)
    if not storage.local:
        raise ConfigError(f"cross-validation writes and reads its ensemble locally: train.storage_path="
                          f"{storage.uri} is remote; train the folds one by one with train.fold")
    ensemble_dir = Path(storage.where(cfg.train.name))
    if ensemble_dir.exists() and not cfg.train.resume:
        announce(f"replacing the previous run at {ensemble_dir} (set train.resume=true to continue its folds)")
        shutil.rmtree(ensemble_dir)
    at_once, cpus = plan_folds(cfg, len(folds))
    announce(f"cross-validation: folds {folds} of {cfg.train.n_folds}, {at_once} at a time, in {ensemble_dir}")
    configs = {k: fold_config(cfg, k) for k in folds}
    if at_once == 1:
        results = {k: run_training(c, announce=lambda line, k=k: announce(f"[fold_{k}] {line}"))
                   for k, c in configs.items()}
    else:
        results, pending, queue = {}, {}, list(folds)
        while queue or pending:
            while queue and len(pending) < at_once:
                k = queue.pop(0)
                pending[_train_fold.remote(configs[k].model_dump_json(), cpus)] = k
            done, _ = ray.wait(list(pending), num_returns=1)
            results[pending.pop(done[0])] = ray.get(done[0])
    best = {k: Path(results[k].best_dir) for k in folds}
    evidence = out_of_fold(cfg, best, announce)
    largest = evidence.decide()
    figures = evidence.figures()
    out_of_fold_metrics: dict[str, float] = {"cases": float(max(f["cases"] for f in figures.values()))}
    for name, f in figures.items():
        out_of_fold_metrics |= {f"dice/{name}": f["dice_largest_component"] if name in largest else f["dice"],
                                f"dice_as_predicted/{name}": f["dice"],
                                f"dice_largest_component/{name}": f["dice_largest_component"]}
    out_of_fold_metrics["dice"] = float(np.mean([out_of_fold_metrics[f"dice/{name}"] for name in figures]))
    write_ensemble(ensemble_dir, [best[k] for k in folds], largest, out_of_fold_metrics)
    return CrossValidationResult(ensemble_dir=ensemble_dir, folds=results, largest_component=largest,
                                 out_of_fold=out_of_fold_metrics)
