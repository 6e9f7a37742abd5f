"""Accuracy on real MRI: ``v2`` trained on the 220 MSD Task04 hippocampus cases under a wall-clock budget.

The whole path a user runs — ``jointray prepare``, ``jointray train`` with
``configs/msd_hippocampus.yaml``, then ``jointray evaluate`` of the exported best checkpoint — on a
local Ray instance, with the outcome heads masked (this data has no clinical targets). Validation is
fold 0 of a 5-fold subject split by seed (44 cases). Two sets of figures for the best checkpoint:
the training loop's validation (prepared grid, one pass), and ``jointray evaluate`` on the same 44
cases in each input's own space, without and with test-time mirroring (nnU-Net's published figures
include mirroring). Prints per-structure Dice and HD95 beside nnU-Net's and writes JSON.

    python benchmarks/accuracy_msd.py [--minutes 20] [--root ../shared/data/msd_hippocampus] [key=value ...]
    python benchmarks/accuracy_msd.py --checkpoint runs/bench_msd/best   # evaluate a trained checkpoint only

MSD Task04 Hippocampus: Simpson et al., arXiv:1902.09063, CC-BY-SA 4.0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from jointray.config import load_config  # noqa: E402
from jointray.data.prepare import prepare_dataset  # noqa: E402
from jointray.data.sources import scan_msd  # noqa: E402
from jointray.data.streaming import split_subjects  # noqa: E402
from jointray.inference.evaluate import evaluate  # noqa: E402
from jointray.runtime import init_ray  # noqa: E402
from jointray.artifacts import read_checkpoint  # noqa: E402
from jointray.train.trainer import run_training  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
#: nnU-Net 3d_fullres, 5-fold cross-validation on Task04 (Isensee et al., Nature Methods 2021), GPU, 1000 epochs.
NNUNET_DICE = {"anterior": 0.90, "posterior": 0.89}


def validation_folder(cfg, folder: Path) -> Path:
    """An MSD ``dataset.json`` listing the validation fold's cases in place (absolute paths)."""
    _, val_ids = split_subjects(cfg.data.output, cfg.train.n_folds, cfg.train.fold, cfg.train.seed)
    keep = set(val_ids)
    records = [r for r in scan_msd(Path(cfg.data.root), cfg.data.label_names).records if r.subject_id in keep]
    meta = json.loads((Path(cfg.data.root) / "dataset.json").read_text())
    meta["training"] = [{"image": r.images[0], "label": r.label} for r in records]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset.json").write_text(json.dumps(meta))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=str(REPO.parent / "shared" / "data" / "msd_hippocampus"))
    parser.add_argument("--minutes", type=float, default=20.0, help="train.max_minutes")
    parser.add_argument("--checkpoint", help="skip training: evaluate this checkpoint (trained on the same split)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "accuracy_msd.json"))
    parser.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = parser.parse_args()
    console = Console(width=160)
    cfg = load_config(REPO / "configs" / "msd_hippocampus.yaml", [
        f"data.root={args.root}", "train.name=bench_msd", f"train.max_minutes={args.minutes}",
        "train.epochs=1000", "train.patience=null", *args.overrides])  # the budget, not an epoch count, ends it
    init_ray(cfg.ray)
    if args.checkpoint:
        best = Path(args.checkpoint)
        loaded = read_checkpoint(best)
        cfg, m, final = loaded.config, loaded.metrics, {}
        cases = len(scan_msd(Path(cfg.data.root), cfg.data.label_names).records)
    else:
        cases = prepare_dataset(cfg).prepared
        result = run_training(cfg, announce=console.print)
        best, m, final = result.best_dir, result.metrics, result.final_metrics
    with tempfile.TemporaryDirectory() as tmp:
        folder = validation_folder(cfg, Path(tmp) / "validation")
        plain = evaluate(best, folder, Path(tmp) / "plain", tta=False).metrics
        mirrored = evaluate(best, folder, Path(tmp) / "tta", tta=True).metrics

    table = Table(title=f"v2 on MSD hippocampus: {cases} cases, fold {cfg.train.fold} of {cfg.train.n_folds} "
                        f"({int(m['val/cases'])} validation), {cfg.train.max_minutes:g} min of training on this CPU")
    for column in ("structure", "Dice (training loop)", "Dice (evaluate)", "Dice (evaluate + mirroring)",
                   "HD95 mm (+ mirroring)", "nnU-Net Dice", "gap"):
        table.add_column(column, justify="right")
    rows = {}
    for name, reference in [*NNUNET_DICE.items(), ("mean", sum(NNUNET_DICE.values()) / len(NNUNET_DICE))]:
        key = "dice" if name == "mean" else f"dice/{name}"
        hd95 = "" if name == "mean" else f"{mirrored[f'hd95/{name}']:.2f}"
        rows[name] = {"dice_training_loop": m[f"val/{key}"], "dice_evaluate": plain[key],
                      "dice_evaluate_mirrored": mirrored[key], "nnunet_dice": reference}
        if name != "mean":
            rows[name] |= {"hd95_mm_training_loop": m[f"val/hd95/{name}"], "hd95_mm_evaluate": plain[f"hd95/{name}"],
                           "hd95_mm_evaluate_mirrored": mirrored[f"hd95/{name}"]}
        table.add_row(name, f"{m[f'val/{key}']:.4f}", f"{plain[key]:.4f}", f"{mirrored[key]:.4f}", hd95,
                      f"{reference:.3f}", f"{mirrored[key] - reference:+.4f}")
    console.print(table)
    epochs_run = int(final.get("epoch", m["epoch"])) + 1
    console.print(f"best checkpoint {best}: epoch {int(m['epoch']) + 1} of {epochs_run} run; "
                  f"{m['cases_per_s']:.1f} training cases/s")
    summary = {
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "minutes": cfg.train.max_minutes, "overrides": args.overrides, "cases": cases,
        "validation_cases": int(m["val/cases"]), "structures": rows, "best_epoch": int(m["epoch"]),
        "epochs_run": epochs_run, "cases_per_s": m["cases_per_s"], "best_checkpoint": str(best),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
