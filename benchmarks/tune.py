"""Trials per hour of the small search (``tune_synthetic``) at 1 and 2 trials at a time on this machine.

The same search — same trials, epochs, data and sampler seed — runs once per concurrency through
``jointray.tune.run_search`` on a local Ray instance, each in a fresh folder. Reported per run: wall
time from the Tuner's start to the written results, trials completed, trials per hour, the mean
trial time, and the CPUs and threads each trial's worker held. Prints the table and writes JSON.

    python benchmarks/tune.py [--trials 4] [--concurrency 1 2] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from jointray.config import load_config  # noqa: E402
from jointray.data.prepare import prepare_dataset  # noqa: E402
from jointray.data.provenance import check_shards_match  # noqa: E402
from jointray.runtime import init_ray  # noqa: E402
from jointray.tune.search import run_search  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2])
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.epochs=3")
    args = parser.parse_args()
    folder = RESULTS / "tune"
    base = [f"tune.num_samples={args.trials}", f"tune.storage_path={folder}", *args.overrides]
    cfg = load_config("tune_synthetic", base)
    init_ray(cfg.ray)
    try:
        check_shards_match(Path(cfg.data.output), cfg)
    except Exception:  # noqa: BLE001 - absent or stale: prepare them (the same shards the demo uses)
        prepare_dataset(cfg)
    rows = []
    for concurrency in args.concurrency:
        name = f"tune_bench_c{concurrency}"
        shutil.rmtree(folder / name, ignore_errors=True)
        run_cfg = load_config("tune_synthetic", [*base, f"tune.name={name}", f"tune.max_concurrent_trials={concurrency}"])
        started = time.perf_counter()
        summary = run_search(run_cfg)
        seconds = time.perf_counter() - started
        table = summary.table
        done = int((table["status"] == "COMPLETE").sum())
        rows.append({"concurrency": concurrency, "trials": len(table), "complete": done, "wall_s": seconds,
                     "trials_per_hour": done / (seconds / 3600), "mean_trial_s": float(table["time_s"].mean()),
                     "worker_cpus": float(table["worker/cpus"].mean()),
                     "worker_threads": float(table["worker/threads"].mean())})
    view = Table(title=f"jointray tune: tune_synthetic, {args.trials} trials of {cfg.train.epochs} epochs, "
                       f"{cfg.data.synthetic.n_subjects} subjects")
    for column in ("trials at once", "complete", "wall (min)", "trials/hour", "mean trial (min)", "CPUs/worker",
                   "threads/worker", "× trials/hour"):
        view.add_column(column, justify="right")
    for row in rows:
        view.add_row(str(row["concurrency"]), f"{row['complete']}/{row['trials']}", f"{row['wall_s'] / 60:.1f}",
                     f"{row['trials_per_hour']:.1f}", f"{row['mean_trial_s'] / 60:.2f}", f"{row['worker_cpus']:.2f}",
                     f"{row['worker_threads']:.0f}", f"{row['trials_per_hour'] / rows[0]['trials_per_hour']:.2f}")
    Console().print(view)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "tune.json"
    out.write_text(json.dumps({"date": date.today().isoformat(), "machine": platform.processor() or platform.machine(),
                               "cpus": os.cpu_count(), "epochs": cfg.train.epochs,
                               "subjects": cfg.data.synthetic.n_subjects, "runs": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
