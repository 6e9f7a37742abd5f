"""What augmentation costs, and whether it starves the trainer.

1. **Per transform**, on real MSD hippocampus cases prepared by ``configs/msd_hippocampus.yaml``
   (1 × 48 × 64 × 48): milliseconds per case for each transform of nnU-Net's set
   (``configs/msd_nnunet_augment.yaml``), applied
   with probability 1 (what one application costs), then for the whole set at the config's
   probabilities (what an average case costs), beside the training step's own cost per case (forward,
   loss, backward and AdamW of the config's model at its batch size and precision, in this process with
   2 torch threads; batch conversion included).
2. **Beside the step**, in the same process: training cases/s and CPU use without augmentation, with it in
   line (as the training loop runs it on a CPU), and one batch ahead in a background thread (as the loop runs
   it beside a GPU), taking turns.
3. **In the trainer**: ``jointray train`` on ``--cases`` MSD cases for ``--epochs`` epochs, once with
   the default light augmentation and once with nnU-Net's set (after a one-epoch warm-up
   run, whose figures are discarded: the first run in a fresh Ray instance pays its start-up costs),
   reporting training cases/s
   and ``data_wait`` (the share of the epoch the training step stood waiting for its batch; on a CPU the
   augmentation runs in line, so this includes it) of the last epoch.

    python benchmarks/augment.py [--cases 100] [--epochs 3] [key=value ...]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from accuracy_msd import msd_list  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from jointray.config import AugmentConfig, load_config  # noqa: E402
from jointray.data.augment import Augmenter  # noqa: E402
from jointray.data.prepare import prepare_dataset  # noqa: E402
from jointray.data.sources import scan_msd  # noqa: E402
from jointray.data.streaming import split_subjects, subjects_dataset  # noqa: E402
from jointray.losses.joint import JointLoss  # noqa: E402
from jointray.models import build_model  # noqa: E402
from jointray.models.layout import to_layout  # noqa: E402
from jointray.precision import autocast_for  # noqa: E402
from jointray.runtime import init_ray  # noqa: E402
from jointray.train.batches import to_model_batch  # noqa: E402
from jointray.train.trainer import fit_clinical_schema, run_training  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "augment"
PROBABILITIES = [name for name in AugmentConfig.model_fields if name.endswith("_prob")]


def per_case_ms(augment: Augmenter, batch: dict[str, np.ndarray], repeats: int) -> float:
    started = time.perf_counter()
    for seed in range(repeats):
        augment(batch, seed)
    return (time.perf_counter() - started) / (repeats * len(batch["image"])) * 1000


def transform_costs(cfg, batch: dict[str, np.ndarray], repeats: int) -> dict[str, float]:
    """ms per case: each transform of the config alone at probability 1, then the whole set as configured."""
    configured = cfg.train.augment
    nothing = {name: 0.0 for name in PROBABILITIES}
    rows = {}
    for name in PROBABILITIES:
        if getattr(configured, name) > 0:
            alone = configured.model_copy(update=nothing | {name: 1.0})
            rows[f"{name.removesuffix('_prob')} (p = 1)"] = per_case_ms(Augmenter(alone), batch, repeats)
    rows["nnU-Net set, configured probabilities"] = per_case_ms(Augmenter(configured), batch, repeats)
    rows["default light set"] = per_case_ms(Augmenter(AugmentConfig()), batch, repeats)
    return rows


def training_step(cfg, schema):
    """One training step of the config's model on a NumPy batch (batch conversion, forward, the segmentation loss,
    backward, AdamW) at its precision and layout, with 2 torch threads: the loop's step without Ray."""
    torch.set_num_threads(2)
    model = to_layout(build_model(cfg.model, 1, schema), cfg.train.channels_last)
    loss_fn = JointLoss(cfg.model, cfg.train.loss)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    autocast, _ = autocast_for(cfg.train.precision, torch.device("cpu"))

    def step(batch: dict[str, np.ndarray]) -> None:
        model_batch = to_model_batch(batch, schema, "cpu", cfg.train.channels_last)
        with autocast():
            out = model(model_batch.image, model_batch.clinical, 1.0, model_batch.voxel_volume)
        total = sum(v for k, v in loss_fn(out, model_batch.targets).items() if k == "seg")
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
    return step


def step_cost_ms(step, batch: dict[str, np.ndarray], steps: int) -> float:
    """ms per case of a training step; the first step (allocation, warm-up) is not timed."""
    step(batch)
    started = time.perf_counter()
    for _ in range(steps):
        step(batch)
    return (time.perf_counter() - started) / (steps * len(batch["image"])) * 1000


def beside_the_step(step, augment: Augmenter, batch: dict[str, np.ndarray], steps: int,
                    rounds: int) -> dict[str, list[dict[str, float]]]:
    """Training cases/s and the process's CPU use (% of one core) of ``steps`` steps: without augmentation, with
    it in line (the training loop on a CPU), and one batch ahead in a background thread (``Augmenter.ahead``, the
    loop beside a GPU).
    The three take turns, ``rounds`` times, so that the machine's drift hits them alike."""
    ways = {"no augmentation": lambda: (batch for _ in range(steps)),
            "augmentation in line (the loop on a CPU)": lambda: augment.in_line((batch for _ in range(steps)),
                                                                                lambda seed: seed),
            "augmentation ahead, in a thread (beside a GPU)": lambda: augment.ahead((batch for _ in range(steps)),
                                                                                     lambda seed: seed)}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in ways}
    for _ in range(rounds):
        for name, batches in ways.items():
            step(batch)
            started, cpu = time.perf_counter(), time.process_time()
            for augmented in batches():
                step(augmented)
            seconds = time.perf_counter() - started
            runs[name].append({"cases_per_s": steps * len(batch["image"]) / seconds,
                               "cpu_percent": (time.process_time() - cpu) / seconds * 100})
    return runs


def in_trainer(config: str, base: list[str], name: str, extra: list[str], epochs: int) -> dict[str, float]:
    """The last epoch's training cases/s and data wait of a ``jointray train`` run."""
    cfg = load_config(REPO / "configs" / config,
                      [*base, f"train.name={name}", f"train.epochs={epochs}", *extra])
    final = run_training(cfg, announce=lambda _: None).final_metrics
    return {"cases_per_s": final["cases_per_s"], "data_wait": final["data_wait"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=str(REPO.parent / "shared" / "data" / "msd_hippocampus"))
    parser.add_argument("--cases", type=int, default=100, help="MSD cases prepared for the trainer runs")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10, help="passes over one batch per transform")
    parser.add_argument("--steps", type=int, default=15, help="training steps per way and round, beside the step")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "augment.json"))
    parser.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = parser.parse_args()
    root = Path(args.root)
    label_names = load_config(REPO / "configs" / "msd_nnunet_augment.yaml").data.label_names
    cases = scan_msd(root, label_names).records[:args.cases]
    subset = msd_list(root, cases, OUT / "cases")
    base = [f"data.root={subset}", f"data.output={OUT / 'prepared'}", f"train.storage_path={OUT / 'runs'}",
            "train.patience=null", *args.overrides]
    cfg = load_config(REPO / "configs" / "msd_nnunet_augment.yaml", base)
    init_ray(cfg.ray)
    prepare_dataset(cfg)
    train_ids, _ = split_subjects(cfg.data.output, cfg.train.n_folds, cfg.train.fold, cfg.train.seed)
    schema = fit_clinical_schema(cfg.data.output, train_ids)
    batch = next(iter(subjects_dataset(cfg.data.output, train_ids).iter_batches(batch_size=cfg.train.batch_size,
                                                                                 batch_format="numpy")))
    costs = transform_costs(cfg, batch, args.repeats)
    train_step = training_step(cfg, schema)
    step = step_cost_ms(train_step, batch, steps=5)
    beside = beside_the_step(train_step, Augmenter(cfg.train.augment), batch, args.steps, args.rounds)
    light = [f"train.augment.{k}={json.dumps(v)}" for k, v in AugmentConfig().model_dump().items()]
    in_trainer("msd_hippocampus.yaml", base, "warm_up", light, 1)  # a fresh Ray instance's start-up costs
    runs = {"default light set": in_trainer("msd_hippocampus.yaml", base, "light", light, args.epochs),
            "nnU-Net set (msd_nnunet_augment.yaml)": in_trainer("msd_nnunet_augment.yaml", base, "nnunet", [],
                                                                args.epochs)}

    console = Console(width=160)
    table = Table(title=f"augmentation cost per case, 1 x {' x '.join(map(str, cfg.preprocess.target_shape))}, "
                        f"{os.cpu_count()} CPUs")
    for column in ("transform", "ms / case", "vs training step"):
        table.add_column(column, justify="right")
    for name, ms in costs.items():
        table.add_row(name, f"{ms:.1f}", f"{ms / step:.2f}")
    table.add_row("training step (forward, backward, AdamW)", f"{step:.1f}", "1.00")
    console.print(table)
    overlap = Table(title=f"beside the step (nnU-Net set), one process, {args.steps} steps a round: cases/s (CPU %)")
    for column in ("augmentation", "cases/s (CPU %)"):
        overlap.add_column(column, justify="right")
    for name, rows in beside.items():
        overlap.add_row(name, ", ".join(f"{r['cases_per_s']:.1f} ({r['cpu_percent']:.0f} %)" for r in rows))
    console.print(overlap)
    trainer = Table(title=f"in the trainer: {len(train_ids)} training cases, last of {args.epochs} epochs")
    for column in ("augmentation", "cases/s", "data wait"):
        trainer.add_column(column, justify="right")
    for name, row in runs.items():
        trainer.add_row(name, f"{row['cases_per_s']:.2f}", f"{row['data_wait']:.1%}")
    console.print(trainer)
    Path(args.out).write_text(json.dumps({
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "cases": len(cases), "epochs": args.epochs, "overrides": args.overrides,
        "ms_per_case": costs, "step_ms_per_case": step, "beside_the_step": beside, "trainer": runs}, indent=2))


if __name__ == "__main__":
    main()
