"""Training throughput: jointray's Ray Train loop against a plain single-process PyTorch loop.

Same model (``v2``), same batch size, same loss and optimiser, same training subjects, in one run:

- plain loop: the training rows read into memory once, then ``model → JointLoss → sum → AdamW``
  in one process with 2 torch threads — the ceiling of what this machine does with this model;
- jointray on Ray Train, 1 worker × 2 threads and 2 workers × 1 thread (DDP over gloo), streaming
  the shards through Ray Data with augmentation off (the plain loop has none either);
- bf16 autocast against fp32, in the plain loop and in the 1-worker Ray run.

Cases/s count training steps only (validation excluded) and skip the first epoch (warm-up, worker
start). Prints a table, writes JSON.

    python benchmarks/train.py [--subjects 40] [--epochs 3] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from jointray.config import load_config  # noqa: E402
from jointray.data.prepare import prepare_dataset  # noqa: E402
from jointray.data.streaming import split_subjects, subjects_dataset  # noqa: E402
from jointray.losses.joint import JointLoss  # noqa: E402
from jointray.models import build_model  # noqa: E402
from jointray.models.layout import to_layout  # noqa: E402
from jointray.precision import autocast_for  # noqa: E402
from jointray.runtime import init_ray  # noqa: E402
from jointray.train.batches import to_model_batch  # noqa: E402
from jointray.train.trainer import fit_clinical_schema, run_training  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def plain_loop(cfg, precision: str, epochs: int) -> float:
    """Cases/s of a single-process loop over in-memory batches (epochs after the first)."""
    torch.manual_seed(cfg.train.seed)
    torch.set_num_threads(2)
    prepared = Path(cfg.data.output)
    train_ids, _ = split_subjects(prepared, cfg.train.n_folds, cfg.train.fold, cfg.train.seed)
    schema = fit_clinical_schema(prepared, train_ids)
    # Read once through the same Ray Dataset the trainer streams, then kept in memory as model batches.
    batches = [to_model_batch(raw, schema, "cpu", cfg.train.channels_last) for raw in
               subjects_dataset(prepared, train_ids).iter_batches(batch_size=cfg.train.batch_size, batch_format="numpy")]
    cases = sum(b.size for b in batches)
    model = to_layout(build_model(cfg.model, 1, schema), cfg.train.channels_last)
    loss_fn = JointLoss(cfg.model, cfg.train.loss)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    autocast, _ = autocast_for(precision, torch.device("cpu"))
    model.train()
    timed_cases, timed_s = 0, 0.0
    for epoch in range(epochs):
        started = time.perf_counter()
        for b in batches:
            with autocast():
                out = model(b.image, b.clinical, 0.5, b.voxel_volume)
            losses = loss_fn(out, b.targets)
            total = sum(v.float() for k, v in losses.items() if k in ("seg", "mmse", "cdr", "risk"))
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimizer.step()
        if epoch:
            timed_cases += cases
            timed_s += time.perf_counter() - started
    return timed_cases / timed_s


def ray_loop(base: list[str], name: str, workers: int, threads: int, precision: str, epochs: int) -> float:
    """Cases/s of ``jointray train`` in its last epoch."""
    cfg = load_config(REPO / "configs" / "synthetic.yaml", [
        *base, f"train.name=bench_train_{name}", f"train.workers={workers}", f"train.threads_per_worker={threads}",
        f"train.precision={precision}", f"train.epochs={epochs}"])
    return run_training(cfg, announce=lambda _: None).final_metrics["cases_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "train.json"))
    parser.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = parser.parse_args()
    base = [f"data.synthetic.n_subjects={args.subjects}", "data.root=runs/bench_train/cohort",
            "data.output=runs/bench_train/prepared", "train.augment.enabled=false", "train.patience=null",
            *args.overrides]
    cfg = load_config(REPO / "configs" / "synthetic.yaml", base)
    init_ray(cfg.ray)
    prepare_dataset(cfg)
    rows = {
        "plain loop, fp32, 2 threads": plain_loop(cfg, "fp32", args.epochs),
        "plain loop, bf16 autocast, 2 threads": plain_loop(cfg, "bf16", args.epochs),
        "Ray Train 1 worker x 2 threads, fp32": ray_loop(base, "1x2_fp32", 1, 2, "fp32", args.epochs),
        "Ray Train 1 worker x 2 threads, bf16": ray_loop(base, "1x2_bf16", 1, 2, "bf16", args.epochs),
        "Ray Train 2 workers x 1 thread, fp32": ray_loop(base, "2x1_fp32", 2, 1, "fp32", args.epochs),
    }
    reference = rows["plain loop, fp32, 2 threads"]
    table = Table(title=f"training throughput, v2 at {tuple(cfg.preprocess.target_shape)}, batch "
                        f"{cfg.train.batch_size}, {os.cpu_count()} CPUs")
    for column in ("loop", "cases/s", "vs plain fp32"):
        table.add_column(column, justify="right")
    for name, value in rows.items():
        table.add_row(name, f"{value:.2f}", f"{value / reference:.2f}x")
    Console(width=160).print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "shape": list(cfg.preprocess.target_shape), "batch_size": cfg.train.batch_size, "subjects": args.subjects,
        "cases_per_s": rows, "ratio_to_plain_fp32": {k: v / reference for k, v in rows.items()}}, indent=2) + "\n")


if __name__ == "__main__":
    main()
