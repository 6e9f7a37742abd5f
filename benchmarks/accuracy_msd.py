"""Accuracy on real MRI: ``v2`` trained on the 220 MSD Task04 hippocampus cases under a wall-clock budget.

The whole path a user runs — ``jointray prepare`` then ``jointray train`` with
``configs/msd_hippocampus.yaml`` — on a local Ray instance, with the outcome heads masked (this data
has no clinical targets). Validation is fold 0 of a 5-fold subject split by seed (44 cases); the
figures are those of the best checkpoint, the one exported to ``runs/<name>/best``. Prints per-
structure Dice and HD95 beside nnU-Net's published figures and writes JSON.

    python benchmarks/accuracy_msd.py [--minutes 20] [--root ../shared/data/msd_hippocampus] [key=value ...]

MSD Task04 Hippocampus: Simpson et al., arXiv:1902.09063, CC-BY-SA 4.0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from jointray.config import load_config  # noqa: E402
from jointray.data.prepare import prepare_dataset  # noqa: E402
from jointray.runtime import init_ray  # noqa: E402
from jointray.train.trainer import run_training  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
#: nnU-Net 3d_fullres, 5-fold cross-validation on Task04 (Isensee et al., Nature Methods 2021), GPU, 1000 epochs.
NNUNET_DICE = {"anterior": 0.90, "posterior": 0.89}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=str(REPO.parent / "shared" / "data" / "msd_hippocampus"))
    parser.add_argument("--minutes", type=float, default=20.0, help="train.max_minutes")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "accuracy_msd.json"))
    parser.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = parser.parse_args()
    console = Console(width=160)
    cfg = load_config(REPO / "configs" / "msd_hippocampus.yaml", [
        f"data.root={args.root}", "train.name=bench_msd", f"train.max_minutes={args.minutes}",
        "train.epochs=1000", "train.patience=null", *args.overrides])  # the budget, not an epoch count, ends it
    init_ray(cfg.ray)
    prepared = prepare_dataset(cfg)
    result = run_training(cfg, announce=console.print)
    m, final = result.metrics, result.final_metrics

    table = Table(title=f"v2 on MSD hippocampus: {prepared.prepared} cases, fold {cfg.train.fold} of "
                        f"{cfg.train.n_folds} ({int(m['val/cases'])} validation), {args.minutes:g} min on this CPU")
    for column in ("structure", "Dice", "HD95 mm", "nnU-Net Dice", "gap"):
        table.add_column(column, justify="right")
    rows = {}
    for name, reference in NNUNET_DICE.items():
        dice, hd95 = m[f"val/dice/{name}"], m[f"val/hd95/{name}"]
        rows[name] = {"dice": dice, "hd95_mm": hd95, "nnunet_dice": reference}
        table.add_row(name, f"{dice:.4f}", f"{hd95:.2f}", f"{reference:.2f}", f"{dice - reference:+.4f}")
    mean_ref = sum(NNUNET_DICE.values()) / len(NNUNET_DICE)
    table.add_row("mean", f"{m['val/dice']:.4f}", "", f"{mean_ref:.3f}", f"{m['val/dice'] - mean_ref:+.4f}")
    console.print(table)
    console.print(f"best checkpoint at epoch {int(m['epoch']) + 1} of {int(final.get('epoch', m['epoch'])) + 1} run; "
                  f"{m['cases_per_s']:.1f} training cases/s; {final.get('elapsed_s', m['elapsed_s']) / 60:.1f} min")
    summary = {
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "minutes": args.minutes,
        "overrides": args.overrides, "cases": prepared.prepared, "validation_cases": int(m["val/cases"]),
        "mean_dice": m["val/dice"], "structures": rows, "best_epoch": int(m["epoch"]),
        "epochs_run": int(final.get("epoch", m["epoch"])) + 1, "cases_per_s": m["cases_per_s"],
        "best_checkpoint": str(result.best_dir),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
