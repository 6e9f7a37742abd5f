"""Does joint learning pay? ``v2``, ``dv1``, ``seg_only`` and ``outcome_only`` on one synthetic cohort.

Every variant trains with the same wall-clock budget, the same subjects, the same fold-0 split and
the same seed, through ``jointray train`` on a local Ray instance. ``outcome_only`` runs with
``model.use_image=false``: the clinical columns alone, the baseline a clinician's model would be.
``dv1`` trains with fixed loss weights, as that variant is defined. Prints the table and two
verdicts — v2's MMSE MAE below the clinical-only model's, and v2's Dice within 0.01 of
``seg_only``'s or better — and writes JSON.

    python benchmarks/joint_learning.py [--subjects 400] [--minutes 5] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import math
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
VARIANTS = {
    "v2": [],
    "dv1": ["train.balancer.kind=fixed"],
    "seg_only": [],
    "outcome_only (clinical only)": ["model.variant=outcome_only", "model.use_image=false"],
}
COLUMNS = {"val/dice": "Dice", "val/mmse_mae": "MMSE MAE", "val/cdr_qwk": "CDR QWK", "val/c_index": "C-index"}


def _fmt(value: float | None) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=400)
    parser.add_argument("--minutes", type=float, default=5.0, help="train.max_minutes of every variant")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "joint_learning.json"))
    parser.add_argument("overrides", nargs="*", help="dotted config overrides for every variant")
    args = parser.parse_args()
    console = Console(width=160)
    base = [f"data.synthetic.n_subjects={args.subjects}", "data.root=runs/bench_joint/cohort",
            "data.output=runs/bench_joint/prepared", f"train.max_minutes={args.minutes}", "train.epochs=1000",
            "train.patience=null", "train.workers=1", *args.overrides]
    cfg = load_config(REPO / "configs" / "synthetic.yaml", base)
    init_ray(cfg.ray)
    console.print(f"prepared {prepare_dataset(cfg).prepared} synthetic subjects")
    results = {}
    for label, extra in VARIANTS.items():
        variant = label.split()[0]
        run_cfg = load_config(REPO / "configs" / "synthetic.yaml",
                              [*base, f"model.variant={variant}", f"train.name=bench_joint_{variant}", *extra])
        console.rule(label)
        metrics = run_training(run_cfg, announce=console.print).metrics
        results[label] = {k: metrics.get(k, math.nan) for k in COLUMNS} | {
            "best_epoch": int(metrics["epoch"]), "cases_per_s": metrics["cases_per_s"]}

    table = Table(title=f"joint learning on {args.subjects} synthetic subjects, {args.minutes:g} min each, fold "
                        f"{cfg.train.fold} of {cfg.train.n_folds}")
    for column in ("variant", *COLUMNS.values(), "best epoch", "cases/s"):
        table.add_column(column, justify="right")
    for label, r in results.items():
        table.add_row(label, *(_fmt(r[k]) for k in COLUMNS), str(r["best_epoch"] + 1), f"{r['cases_per_s']:.1f}")
    console.print(table)
    v2, seg, clin = results["v2"], results["seg_only"], results["outcome_only (clinical only)"]
    verdicts = {
        "v2_mmse_beats_clinical_only": v2["val/mmse_mae"] < clin["val/mmse_mae"],
        "v2_dice_within_0.01_of_seg_only": v2["val/dice"] >= seg["val/dice"] - 0.01,
    }
    console.print(f"v2 MMSE MAE {v2['val/mmse_mae']:.3f} vs clinical only {clin['val/mmse_mae']:.3f} "
                  f"(ratio {v2['val/mmse_mae'] / clin['val/mmse_mae']:.2f}); v2 Dice {v2['val/dice']:.4f} vs seg_only "
                  f"{seg['val/dice']:.4f} ({v2['val/dice'] - seg['val/dice']:+.4f}): {verdicts}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "machine": platform.processor() or platform.machine(), "subjects": args.subjects, "minutes": args.minutes,
        "overrides": args.overrides, "variants": results, "verdicts": verdicts}, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
