"""Which of v2's parts pay on the synthetic cohort? An ablation grid, then a search over loss weights and dropout.

Arms, each against ``configs/synthetic.yaml``'s v2 (fixed task weights, no curriculum), one change at
a time: attention gates off, FiLM + cross-attention fusion off, cross-task paths off, the adaptive
``inverse_rate`` balancer instead of the fixed weights, the curriculum on (its default phases); plus ``dv1`` (the plain trunk)
and ``seg_only``. Every arm is a Ray Tune grid over ``train.seed`` (``--seeds``), run by
``jointray.tune.run_search`` (``searcher: grid``) with the same wall-clock budget per trial, the same
subjects and the same fold-0 split; the seed changes initialisation, data order and augmentation,
never the split (``train.n_folds``/``fold`` pick it from the subjects alone). The table shows each
metric's mean ± spread (half the range) over seeds, best checkpoint by ``val/score``.

Then a multi-objective search (validation Dice up, MMSE MAE down) over the task weights and dropout at
the same budget per trial, seeded with the hand-set configuration; the verdict says whether a Pareto
trial beats the hand-set v2 of the grid on both objectives (mean over its seeds).

    python benchmarks/ablation.py [--subjects 400] [--minutes 3] [--seeds 0 1] [--search-trials 8] [key=value ...]

``--arms 0 3 --search-trials 0 --tag ablation_rerun`` reruns some arms alone (indices into the arms in the
order above) into ``benchmarks/results/<tag>/`` and ``<tag>.json``, leaving the full run's results alone.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
from datetime import date
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")

import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from jointray.config import load_config, override_text  # noqa: E402
from jointray.data.prepare import prepare_dataset  # noqa: E402
from jointray.runtime import init_ray  # noqa: E402
from jointray.tune.search import run_search  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
ARMS = {
    "v2 (synthetic.yaml)": [],
    "- attention gates": ["model.attention_gates=false"],
    "- FiLM/cross-attention": ["model.clinical_fusion=false"],
    "- cross-task paths": ["model.cross_task=false"],
    "+ adaptive balancer": ["train.balancer.kind=inverse_rate"],
    "+ curriculum": ["train.curriculum.enabled=true"],
    "dv1": ["model.variant=dv1"],
    "seg_only": ["model.variant=seg_only"],
}
METRICS = {"val/dice": "Dice", "val/mmse_mae": "MMSE MAE", "val/cdr_qwk": "CDR QWK", "val/c_index": "C-index"}
SEARCH_SPACE = {
    "train.balancer.weights.mmse": {"loguniform": [0.02, 0.5]},
    "train.balancer.weights.cdr": {"loguniform": [0.05, 1.0]},
    "train.balancer.weights.risk": {"loguniform": [0.05, 1.0]},
    "model.dropout": {"uniform": [0.0, 0.3]},
    "model.head_dropout": {"uniform": [0.0, 0.4]},
}
HAND_SET = {"train.balancer.weights.mmse": 0.1, "train.balancer.weights.cdr": 0.3, "train.balancer.weights.risk": 0.3,
            "model.dropout": 0.1, "model.head_dropout": 0.2}


def _cell(values: list[float]) -> str:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return "—"
    mean, spread = float(np.mean(finite)), (max(finite) - min(finite)) / 2
    return f"{mean:.4f} ± {spread:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=400)
    parser.add_argument("--minutes", type=float, default=3.0, help="train.max_minutes of every trial")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--search-trials", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--arms", type=int, nargs="+", default=list(range(len(ARMS))), help="arm indices to run")
    parser.add_argument("--tag", default="ablation", help="results folder and JSON name under benchmarks/results/")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides for every trial")
    args = parser.parse_args()
    console = Console(width=160)
    folder = RESULTS / args.tag
    shutil.rmtree(folder, ignore_errors=True)
    base = [f"data.synthetic.n_subjects={args.subjects}", "data.root=runs/bench_joint/cohort",
            "data.output=runs/bench_joint/prepared", f"train.max_minutes={args.minutes}", "train.epochs=1000",
            "train.patience=null", "train.workers=1", f"tune.storage_path={folder}",
            f"tune.max_concurrent_trials={args.concurrency}", *args.overrides]
    cfg = load_config("synthetic", base)
    init_ray(cfg.ray)
    console.print(f"prepared {prepare_dataset(cfg).prepared} synthetic subjects")

    grid: dict[str, dict[str, list[float]]] = {}
    for index, (arm, extra) in enumerate(ARMS.items()):
        if index not in args.arms:
            continue
        console.rule(arm)
        arm_cfg = load_config("synthetic", [
            *base, *extra, f"tune.name=arm{index}", "tune.searcher=grid", "tune.num_samples=1",
            "tune.objectives={val/score: max}",
            override_text("tune.space", {"train.seed": {"grid": args.seeds}})])
        table = run_search(arm_cfg).table
        done = table[table["status"] == "COMPLETE"]
        grid[arm] = {k: [float(v) for v in done[k]] if k in done else [] for k in METRICS}
        grid[arm]["epochs"] = [float(v) for v in done["epochs"]]

    view = Table(title=f"ablation on {args.subjects} synthetic subjects, {args.minutes:g} min per trial, seeds "
                       f"{args.seeds}, fold {cfg.train.fold} of {cfg.train.n_folds} (mean ± half-range over seeds)")
    for column in ("arm", *METRICS.values(), "epochs"):
        view.add_column(column, justify="right")
    for arm, values in grid.items():
        view.add_row(arm, *(_cell(values[k]) for k in METRICS), _cell(values["epochs"]))
    console.print(view)
    result = {"date": date.today().isoformat(), "machine": platform.processor() or platform.machine(),
              "subjects": args.subjects, "minutes": args.minutes, "seeds": args.seeds, "overrides": args.overrides,
              "arms": grid}
    if args.search_trials > 0:
        console.rule("multi-objective search over task weights and dropout")
        search_cfg = load_config("synthetic", [
            *base, "tune.name=weights_search", f"tune.num_samples={args.search_trials}",
            "tune.objectives={val/dice: max, val/mmse_mae: min}", "tune.scheduler=none",
            override_text("tune.space", SEARCH_SPACE), override_text("tune.points_to_evaluate", [HAND_SET])])
        search = run_search(search_cfg).table
        front = search[search["pareto"]]
        hand = {k: float(np.mean(grid["v2 (synthetic.yaml)"][k])) for k in ("val/dice", "val/mmse_mae")}
        beats = front[(front["val/dice"] > hand["val/dice"]) & (front["val/mmse_mae"] < hand["val/mmse_mae"])]
        shown = ["trial_id", *(f"param/{k}" for k in SEARCH_SPACE), "val/dice", "val/mmse_mae"]
        console.print(front[shown].to_string(index=False))
        console.print(f"hand-set v2 (grid mean): Dice {hand['val/dice']:.4f}, MMSE MAE {hand['val/mmse_mae']:.3f}; "
                      f"Pareto trials better on both: {len(beats)}")
        result |= {"search": search.drop(columns=["error"]).to_dict(orient="records"), "hand_set": hand,
                   "pareto_beats_hand_set_on_both": beats["trial_id"].tolist()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{args.tag}.json"
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
