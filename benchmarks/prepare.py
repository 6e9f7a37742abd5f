"""Preprocessing throughput: jointray's Ray Data pipeline vs a plain single-process loop.

Both run the same per-case function (validate + preprocess, ``prepare_one``) over the same MSD
cases and both write Parquet, in one run on this machine. Ray start-up is timed separately.

    python benchmarks/prepare.py [--root ../shared/data/msd_hippocampus] [--out benchmarks/results/prepare.json] [key=value ...]

Overrides change the work per case, e.g. ``preprocess.target_spacing=[0.6,0.6,0.6] preprocess.target_shape=[80,112,80]``
(resampling to a finer grid makes each case ~10x more expensive).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import pyarrow.parquet as pq  # noqa: E402
import ray  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from jointray.config import load_config  # noqa: E402
from jointray.data.prepare import prepare_dataset, prepare_one  # noqa: E402
from jointray.data.records import Quarantined  # noqa: E402
from jointray.data.shards import rows_to_table  # noqa: E402
from jointray.data.sources import scan_source  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def plain_loop(cfg, out: Path) -> tuple[int, float]:
    started = time.perf_counter()
    scan = scan_source(cfg.data)
    kinds = dict(cfg.data.clinical_columns)
    rows = []
    for record in scan.records:
        result = prepare_one(record, cfg.preprocess, set(cfg.data.label_names), cfg.data.max_voxels, kinds)
        if not isinstance(result, Quarantined):
            rows.append(result)
    out.mkdir(parents=True)
    for i in range(0, len(rows), cfg.data.rows_per_shard):
        pq.write_table(rows_to_table(rows[i : i + cfg.data.rows_per_shard]), out / f"shard-{i:05d}.parquet")
    return len(rows), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=str(REPO.parent / "shared" / "data" / "msd_hippocampus"))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "prepare.json"))
    parser.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(REPO / "configs" / "msd_hippocampus.yaml", [f"data.root={args.root}", f"data.output={tmp}/ray", *args.overrides])
        n_loop, t_loop = plain_loop(cfg, Path(tmp) / "loop")
        t0 = time.perf_counter()
        ray.init(include_dashboard=False, log_to_driver=False)
        t_init = time.perf_counter() - t0
        cpus = int(ray.cluster_resources().get("CPU", 0))
        # Cold: the first run also starts the worker processes and imports torch/MONAI in them.
        t_cold = prepare_dataset(cfg).elapsed_s
        report = prepare_dataset(cfg)
        t_ray = report.elapsed_s
        ray.shutdown()
    result = {
        "cases": n_loop,
        "overrides": args.overrides,
        "cpus": cpus,
        "machine": platform.processor() or platform.machine(),
        "plain_loop": {"seconds": round(t_loop, 2), "cases_per_s": round(n_loop / t_loop, 2)},
        "ray_data": {"seconds": t_ray, "cases_per_s": round(report.prepared / t_ray, 2), "ray_init_s": round(t_init, 2),
                     "cold_seconds": t_cold},
        "speedup": round(t_loop / t_ray, 2),
    }
    assert report.prepared == n_loop, (report.prepared, n_loop)
    table = Table(title=f"prepare: {n_loop} MSD cases, {cpus} CPUs")
    for column in ("path", "seconds", "cases/s"):
        table.add_column(column)
    table.add_row("plain single-process loop", f"{t_loop:.2f}", f"{n_loop / t_loop:.1f}")
    table.add_row("Ray Data pipeline (warm workers)", f"{t_ray:.2f}", f"{report.prepared / t_ray:.1f}")
    table.add_row("Ray Data pipeline (cold: first run)", f"{t_cold:.2f}", f"{report.prepared / t_cold:.1f}")
    table.add_row("ratio (loop time / warm Ray time)", f"{result['speedup']:.2f}x", "")
    console = Console(width=160)
    console.print(table)
    console.print(f"Ray start-up (not included above): {t_init:.1f} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
