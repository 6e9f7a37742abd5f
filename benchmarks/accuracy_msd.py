"""Accuracy on real MRI: ``v2`` trained on MSD Task04 hippocampus cases under a wall-clock budget.

The whole path a user runs — ``jointray prepare``, ``jointray train`` with
``configs/msd_hippocampus.yaml`` (or ``--config``), then ``jointray evaluate`` of the best checkpoint — on a local Ray
instance, with the outcome heads masked (this data has no clinical targets).

An inner split keeps the reported figure honest. Before anything is prepared, a test part of the
cases (``--test-fraction``, drawn by ``--test-seed``) is held out; prepare and train see only the rest
(the pool), whose fold ``train.fold`` of ``train.n_folds`` validates every epoch and chooses the best
checkpoint. Two sets of figures for that checkpoint:

* **validation fold** (the cases the checkpoint was chosen on, hence optimistic): the training loop's
  validation (prepared grid, one pass, training precision) and ``jointray evaluate`` on those cases
  in each input's own space, with test-time mirroring;
* **held-out test** (cases that played no part in training or in choosing the checkpoint):
  ``jointray evaluate`` without and with mirroring (nnU-Net's published figures include mirroring).

With ``--all-cases`` the model trains on every pool case (``train.fold=all``, nnU-Net's "all" fold: the
last checkpoint, nothing held out to choose by) and has no validation figures. With ``--all-folds``
every fold of the pool trains for ``--minutes`` (``jointray train --all-folds``, one
after another on this machine) and the folds' ensemble is evaluated instead; its validation figures are
the out-of-fold Dice (each fold's checkpoint on its own validation cases, the evidence for
post-processing), the training loop's are the folds' mean.

Prints per-structure Dice, HD95 (a missed structure scores the image diagonal) and misses beside
nnU-Net's Dice and writes JSON. The two MSD lists (``dataset.json`` with absolute paths: the data
stays in place) are written under ``--split-dir``.

    python benchmarks/accuracy_msd.py [--minutes 20] [--config msd_nnunet_augment.yaml] [key=value ...]
    python benchmarks/accuracy_msd.py --all-folds --minutes 20   # 5 folds x 20 min, then their ensemble
    python benchmarks/accuracy_msd.py --all-cases --minutes 20   # one model on all 176 pool cases
    python benchmarks/accuracy_msd.py --checkpoint runs/bench_msd/best   # evaluate a checkpoint of this split only

MSD Task04 Hippocampus: Simpson et al., arXiv:1902.09063, CC-BY-SA 4.0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
from pathlib import Path

import numpy as np

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")

from rich.console import Console
from rich.table import Table

from jointray.artifacts import load_models
from jointray.config import load_config
from jointray.data.prepare import prepare_dataset
from jointray.data.records import CaseRecord
from jointray.data.sources import scan_msd
from jointray.data.streaming import split_subjects
from jointray.inference.evaluate import evaluate
from jointray.runtime import init_ray
from jointray.train.folds import run_cross_validation
from jointray.train.trainer import run_training

REPO = Path(__file__).resolve().parents[1]
#: nnU-Net 3d_fullres, 5-fold cross-validation on Task04 (Isensee et al., Nature Methods 2021), GPU, 1000 epochs.
NNUNET_DICE = {"anterior": 0.90, "posterior": 0.89}


def msd_list(root: Path, records: list[CaseRecord], folder: Path) -> Path:
    """An MSD folder at ``folder`` whose ``dataset.json`` lists ``records`` of ``root`` in place (absolute paths)."""
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"] = [{"image": r.images[0], "label": r.label} for r in records]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset.json").write_text(json.dumps(meta))
    return folder


def hold_out(root: Path, label_names: dict[int, str], fraction: float, seed: int,
             split_dir: Path) -> tuple[Path, Path, set[str]]:
    """(pool folder, test folder, test subject IDs): ``fraction`` of the cases, drawn by a seeded permutation
    of the sorted IDs (the same split whatever the order of ``dataset.json``), held out as the test set."""
    if not 0 < fraction < 1:
        raise SystemExit(f"--test-fraction must be in (0, 1), got {fraction}")
    records = sorted(scan_msd(root, label_names).records, key=lambda r: r.subject_id)
    order = np.random.default_rng(seed).permutation(len(records))
    test = {records[i].subject_id for i in order[:round(fraction * len(records))]}
    pool = msd_list(root, [r for r in records if r.subject_id not in test], split_dir / "pool")
    return pool, msd_list(root, [r for r in records if r.subject_id in test], split_dir / "test"), test


def validation_folder(cfg, folder: Path) -> Path:
    """An MSD folder listing the validation fold's cases of the pool in place."""
    _, val_ids = split_subjects(cfg.data.output, cfg.train.n_folds, cfg.train.fold, cfg.train.seed)
    keep = set(val_ids)
    root = Path(cfg.data.root)
    return msd_list(root, [r for r in scan_msd(root, cfg.data.label_names).records if r.subject_id in keep], folder)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=str(REPO.parent / "shared" / "data" / "msd_hippocampus"))
    parser.add_argument("--config", default="msd_hippocampus.yaml",
                        help="a config in configs/, e.g. msd_nnunet_augment.yaml (nnU-Net's augmentation)")
    parser.add_argument("--minutes", type=float, default=20.0, help="train.max_minutes")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="share of the cases held out as the test set")
    parser.add_argument("--test-seed", type=int, default=0, help="seed of the test draw")
    parser.add_argument("--split-dir", default="runs/bench_msd_split", help="where the pool and test lists go")
    parser.add_argument("--checkpoint", help="skip training: evaluate this checkpoint or ensemble (trained on this "
                        "split's pool)")
    parser.add_argument("--all-folds", action="store_true", help="train every fold of the pool; evaluate the ensemble")
    parser.add_argument("--all-cases", action="store_true", help="train on every pool case (train.fold=all)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "accuracy_msd.json"))
    parser.add_argument("overrides", nargs="*", help="dotted config overrides")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    console = Console(width=180)
    config = REPO / "configs" / args.config
    label_names = load_config(config, args.overrides).data.label_names
    pool, test_folder, test_ids = hold_out(Path(args.root), label_names, args.test_fraction, args.test_seed,
                                           Path(args.split_dir))
    cfg = load_config(config, [
        f"data.root={pool.resolve()}", "data.output=runs/prepared/bench_msd", "train.name=bench_msd",
        f"train.max_minutes={args.minutes}", "train.epochs=1000", "train.patience=null",
        *args.overrides])  # the budget, not an epoch count, ends it
    init_ray(cfg.ray)
    folds = out_of_fold = None
    if args.checkpoint:
        best = Path(args.checkpoint)
        loaded = load_models(best)
        cfg, m, final = loaded.members[0].config, loaded.members[0].metrics, {}
        if len(loaded.members) > 1:
            out_of_fold = {k.removeprefix("out_of_fold/"): v for k, v in loaded.metrics.items()}
        trained_on = {r.subject_id for r in scan_msd(Path(cfg.data.root), cfg.data.label_names).records}
        if trained_on & test_ids:
            raise SystemExit(f"{best} was trained on {len(trained_on & test_ids)} of the held-out test cases "
                             f"(its data.root {cfg.data.root} is not this split's pool): train it with this script")
        cases = len(trained_on)
    elif args.all_folds:
        cases = prepare_dataset(cfg).prepared
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"folds": list(range(cfg.train.n_folds))})})
        folds = run_cross_validation(cfg, announce=console.print)
        best, out_of_fold = folds.ensemble_dir, folds.out_of_fold
        runs = [r.metrics for r in folds.folds.values()]
        m = {k: float(np.mean([r[k] for r in runs])) for k in runs[0] if k.startswith("val/") or k == "cases_per_s"}
        m["epoch"], final = float(np.mean([r["epoch"] for r in runs])), {}
    else:
        if args.all_cases:
            cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"fold": "all"})})
            out_of_fold = {}  # no case is held out of training: no validation figures
        cases = prepare_dataset(cfg).prepared
        result = run_training(cfg, announce=console.print)
        best, m, final = result.best_dir, result.metrics, result.final_metrics
    with tempfile.TemporaryDirectory() as tmp:
        if out_of_fold is None:
            val_folder = validation_folder(cfg, Path(tmp) / "validation")
            val_mirrored = evaluate(best, val_folder, Path(tmp) / "val_tta", tta=True).metrics
        else:  # an ensemble: every pool case out of fold; Dice only
            val_mirrored = out_of_fold
        test_plain = evaluate(best, test_folder, Path(tmp) / "test_plain", tta=False).metrics
        test_mirrored = evaluate(best, test_folder, Path(tmp) / "test_tta", tta=True).metrics

    if folds is not None:
        chosen = f"the {cfg.train.n_folds} folds' ensemble, each fold's checkpoint picked on its own fold"
    elif cfg.train.fold == "all":
        chosen = "all of them train, the last checkpoint kept"
        m = {k: v for k, v in m.items() if not k.startswith("val/")} | {"val/cases": 0.0}  # scored training cases
    else:
        chosen = f"fold {cfg.train.fold} of {cfg.train.n_folds} ({int(m['val/cases'])} cases) validates and picks it"
    table = Table(title=f"{cfg.model.variant} on MSD hippocampus: {len(test_ids)} test cases held out; "
                        f"{cases} in the pool, {chosen}; "
                        f"{cfg.train.max_minutes:g} min of training (per fold) on this machine")
    for column in ("structure", "val Dice (training loop)", "val Dice (evaluate + mirroring)", "test Dice (evaluate)",
                   "test Dice (+ mirroring)", "test HD95 mm (+ mirroring)", "test missed", "nnU-Net Dice",
                   "test gap"):
        table.add_column(column, justify="right")
    rows = {}
    for name, reference in [*NNUNET_DICE.items(), ("mean", sum(NNUNET_DICE.values()) / len(NNUNET_DICE))]:
        key = "dice" if name == "mean" else f"dice/{name}"
        rows[name] = {"validation": {"dice_training_loop": m.get(f"val/{key}", math.nan),
                                     "dice_evaluate_mirrored": val_mirrored.get(key, math.nan)},
                      "test": {"dice_evaluate": test_plain[key], "dice_evaluate_mirrored": test_mirrored[key]},
                      "nnunet_dice": reference}
        hd95 = missed = ""
        if name != "mean":
            rows[name]["validation"] |= {"hd95_mm_training_loop": m.get(f"val/hd95/{name}", math.nan),
                                         "hd95_mm_evaluate_mirrored": val_mirrored.get(f"hd95/{name}", math.nan)}
            rows[name]["test"] |= {"hd95_mm_evaluate_mirrored": test_mirrored[f"hd95/{name}"],
                                   "missed_mirrored": int(test_mirrored[f"missed/{name}"])}
            hd95, missed = f"{test_mirrored[f'hd95/{name}']:.2f}", str(int(test_mirrored[f"missed/{name}"]))
        table.add_row(name, f"{rows[name]['validation']['dice_training_loop']:.4f}",
                      f"{rows[name]['validation']['dice_evaluate_mirrored']:.4f}", f"{test_plain[key]:.4f}",
                      f"{test_mirrored[key]:.4f}", hd95, missed, f"{reference:.3f}",
                      f"{test_mirrored[key] - reference:+.4f}")
    console.print(table)
    epochs_run = int(final.get("epoch", m["epoch"])) + 1
    console.print(f"best checkpoint {best}: epoch {int(m['epoch']) + 1} of {epochs_run} run; "
                  f"{m['cases_per_s']:.1f} training cases/s")
    if folds is not None:
        console.print(f"largest connected component kept for: {', '.join(folds.largest_component) or 'none'}; "
                      f"out of fold: {json.dumps(folds.out_of_fold)}")
    summary = {
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "all_folds": args.all_folds,
        "largest_component": folds.largest_component if folds else None,
        "minutes": cfg.train.max_minutes, "config": args.config, "overrides": args.overrides, "pool_cases": cases,
        "validation_cases": int(m["val/cases"]), "test_cases": len(test_ids), "test_fraction": args.test_fraction,
        "test_seed": args.test_seed, "test_subjects": sorted(test_ids), "structures": rows,
        "best_epoch": int(m["epoch"]), "epochs_run": epochs_run, "cases_per_s": m["cases_per_s"],
        "best_checkpoint": str(best),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
