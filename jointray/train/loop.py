"""The per-worker training loop that Ray Train runs (one process per worker, DDP between them).

Each epoch: stream the worker's shard of the (augmented) training data, weigh the task losses with
the curriculum phase and the balancer, step AdamW under a warm-up + cosine schedule scaled by the
phase's peak learning rate, then validate on the worker's shard of the validation data, gather the
per-case results from every worker, compute metrics and the combined score, and report them — with
a checkpoint from rank 0 — to Ray Train. A restarted worker resumes from the latest checkpoint.
"""

from __future__ import annotations

import logging
import math
import os
import random
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from jointray.artifacts import read_checkpoint, write_checkpoint
from jointray.config import Config
from jointray.data.spec import PreprocessSpec
from jointray.data.clinical import ClinicalSchema
from jointray.losses.joint import JointLoss
from jointray.metrics.cohort import validation_metrics
from jointray.models import build_model
from jointray.models.joint import JointModel
from jointray.models.layout import to_layout
from jointray.precision import autocast_for
from jointray.train.balancing import LossBalancer, make_balancer
from jointray.train.batches import to_model_batch
from jointray.train.curriculum import Curriculum
from jointray.train.progress import epoch_line
from jointray.train.tracking import Tracker
from jointray.train.validation import combined_score, predict_cases

#: Cases kept in the local shuffle buffer of the training iterator.
SHUFFLE_BUFFER = 16


def lr_factor(step: int, warmup_steps: int, progress: float) -> float:
    """Linear warm-up to 1 over ``warmup_steps``, then cosine decay to 0 as ``progress`` goes 0 → 1."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def training_progress(step: int, total_steps: int, warmup_steps: int, elapsed_s: float, budget_s: float) -> float:
    """How far the run is, 0 → 1: by steps, or by the wall-clock budget when that ends it sooner, so a
    time-limited run still anneals its learning rate and walks through every curriculum phase."""
    by_steps = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min(1.0, max(by_steps, elapsed_s / budget_s))


def _shared_elapsed(started: float, world: int, device: torch.device, budget_s: float) -> float:
    """Seconds since ``started``, the same on every rank (the slowest clock), so that every worker
    takes the same learning rate, curriculum phase and decision to stop — a rank that stopped alone
    would leave the others waiting in DDP's all-reduce forever. Without a budget the clock decides
    nothing, and each rank keeps its own (no extra all-reduce per step)."""
    elapsed = time.perf_counter() - started
    if world == 1 or not math.isfinite(budget_s):
        return elapsed
    value = torch.tensor([elapsed], dtype=torch.float64, device=device)  # NCCL reduces GPU tensors only
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value)


def _validation_rows(raw: dict[str, np.ndarray], rank: int, world: int) -> dict[str, np.ndarray] | None:
    """This rank's share of a validation batch. Every worker reads the whole (unsplit) validation set
    and predicts the subjects that hash to its rank: disjoint, complete, whatever the read order —
    an equal split would drop the remainder cases from the metrics."""
    if world == 1:
        return raw
    mine = np.array([zlib.crc32(str(s).encode()) % world == rank for s in raw["subject_id"]])
    if not mine.any():
        return None
    return {k: (v[mine] if isinstance(v, np.ndarray) else [x for x, m in zip(v, mine) if m]) for k, v in raw.items()}


def _unwrap(model: torch.nn.Module) -> JointModel:
    return model.module if hasattr(model, "module") else model


def _tasks(model: JointModel) -> list[str]:
    tasks = ["seg"] if model.decoder is not None else []
    return tasks + (list(model.cfg.heads) if model.heads is not None else [])


def _all_mean(values: dict[str, float], world: int) -> dict[str, float]:
    """Mean of each value over workers (NaN where a worker never saw the task)."""
    if world == 1:
        return values
    gathered: list[dict[str, float]] = [{} for _ in range(world)]
    dist.all_gather_object(gathered, values)
    keys = set().union(*gathered)
    return {k: float(np.nanmean([g.get(k, math.nan) for g in gathered])) for k in keys}


def _sync_balancer(balancer: LossBalancer, world: int) -> None:
    """Learnable balancer state lives outside DDP: average it across workers so every rank agrees."""
    if world == 1:
        return
    for tensor in list(balancer.parameters()):
        if tensor.grad is not None:
            dist.all_reduce(tensor.grad)
            tensor.grad /= world
    if hasattr(balancer, "task_weights"):  # GradNorm updates its weights itself, from each rank's batch
        dist.all_reduce(balancer.task_weights.data)
        balancer.task_weights.data /= world


def _inject_fault(cfg: Config, step: int, rank: int, marker: Path | None) -> None:
    """Fault-tolerance testing: kill this worker process at ``train.fault_at_step``, once per run."""
    at = cfg.train.fault_at_step or int(os.environ.get("JOINTRAY_FAULT_AT_STEP", 0)) or None
    if at is None or step != at or rank != 0 or marker is None or marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"fault injected at step {step}\n")
    os._exit(1)  # a hard crash, as a lost node looks to Ray: no exception handling, no cleanup


def _node_count(world: int) -> int:
    """Distinct Ray nodes that host this run's workers (reported, so placement can be checked)."""
    node = ray.get_runtime_context().get_node_id()
    if world == 1:
        return 1
    nodes: list[str] = [""] * world
    dist.all_gather_object(nodes, node)
    return len(set(nodes))


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
            "python": list(random.getstate()[1])}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), 624, 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))


def _quiet_worker_logs(level: str) -> None:
    """``train.log_level`` for the loggers that print on every epoch from inside a worker: Ray Data's
    (dataset execution lines) and Ray Train 2.60's report log, which records the whole metrics dict
    at INFO from a logger named by its file path — out of reach of ``ray.train.LoggingConfig``."""
    from ray.train.v2._internal.execution import context as train_context

    for name in ("ray.data", train_context.__file__):
        logging.getLogger(name).setLevel(level)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    cfg = Config.model_validate_json(loop_config["config"])
    _quiet_worker_logs(cfg.train.log_level)
    spec = PreprocessSpec.model_validate_json(loop_config["spec"])
    schema = ClinicalSchema.model_validate_json(loop_config["schema"])
    steps_per_epoch: int = loop_config["steps_per_epoch"]
    fault_marker = Path(loop_config["fault_marker"]) if loop_config.get("fault_marker") else None

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(loop_config["threads"])
    torch.manual_seed(cfg.train.seed + rank)
    np.random.seed(cfg.train.seed + rank)
    random.seed(cfg.train.seed + rank)
    device = ray.train.torch.get_device()
    nodes = _node_count(world)

    model = to_layout(build_model(cfg.model, spec.channels, schema), cfg.train.channels_last)
    tasks = _tasks(model)
    shared = list(model.encoder.levels[-1].parameters()) if model.encoder is not None else list(
        model.to_hidden.parameters())
    balancer = make_balancer(cfg.train.balancer, tasks, shared).to(device)
    curriculum = Curriculum(cfg.train.curriculum, lr=cfg.train.lr)
    loss_fn = JointLoss(cfg.model, cfg.train.loss)
    model = ray.train.torch.prepare_model(model)
    optimizer = torch.optim.AdamW([
        {"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": cfg.train.weight_decay},
        {"params": [p for p in balancer.parameters() if p.requires_grad], "weight_decay": 0.0},
    ], lr=cfg.train.lr)
    autocast, scaler = autocast_for(cfg.train.precision, device)
    structures = {k: v for k, v in cfg.data.label_names.items() if k != 0}
    spacing = tuple(spec.target_spacing) if spec.target_spacing else (1.0, 1.0, 1.0)

    epoch, step, best, stale, elapsed_before = 0, 0, -math.inf, 0, 0.0
    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        with resumed.as_directory() as folder:
            state = read_checkpoint(folder, map_location=device).state
        _unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        balancer.load_state_dict(state["balancer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        epoch, step, best, stale = state["epoch"] + 1, state["step"], state["best"], state["stale"]
        elapsed_before = state["elapsed_s"]
        _set_rng_state(state["rng"])
    tracker = Tracker(cfg, loop_config.get("tensorboard_dir"), loop_config.get("mlflow_uri"),
                      resumed is not None) if rank == 0 else None

    total_steps = cfg.train.epochs * steps_per_epoch
    warmup_steps = int(cfg.train.warmup_epochs * steps_per_epoch)
    budget_s = cfg.train.max_minutes * 60 if cfg.train.max_minutes else math.inf
    started = time.perf_counter() - elapsed_before
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    stop = False
    while epoch < cfg.train.epochs and not stop:
        phase = curriculum.at(training_progress(epoch * steps_per_epoch, total_steps, 0,
                                                _shared_elapsed(started, world, device, budget_s), budget_s))
        model.train()
        balancer.train()
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        cases, epoch_started = 0, time.perf_counter()
        for raw in train_shard.iter_batches(batch_size=cfg.train.batch_size, batch_format="numpy",
                                            local_shuffle_buffer_size=SHUFFLE_BUFFER,
                                            local_shuffle_seed=cfg.train.seed + 1000 * epoch + rank):
            step += 1
            _inject_fault(cfg, step, rank, fault_marker)
            elapsed = _shared_elapsed(started, world, device, budget_s)
            progress = training_progress(step - 1, total_steps, warmup_steps, elapsed, budget_s)
            for group in optimizer.param_groups:
                group["lr"] = phase.lr * lr_factor(step - 1, warmup_steps, progress)
            batch = to_model_batch(raw, schema, device, cfg.train.channels_last)
            with autocast():
                out = model(batch.image, batch.clinical, phase.cross, batch.voxel_volume)
            losses = loss_fn(out, batch.targets)
            task_losses = {k: v.float() for k, v in losses.items() if k in tasks}
            total = balancer(task_losses, scales=phase.scales(task_losses))
            if "correlation" in losses:
                total = total + losses["correlation"]
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(total).backward()
                scaler.unscale_(optimizer)
            else:
                total.backward()
            _sync_balancer(balancer, world)
            if cfg.train.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            for name, value in task_losses.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach()) * batch.size
                counts[name] = counts.get(name, 0) + batch.size
            cases += batch.size
            if elapsed > budget_s:
                stop = True  # the budget is spent: validate and checkpoint this partial epoch, then end
                break
        train_seconds = time.perf_counter() - epoch_started
        epoch_losses = _all_mean({k: sums[k] / counts[k] for k in sums}, world)
        balancer.epoch_end({k: v for k, v in epoch_losses.items() if not math.isnan(v)})

        shares = (_validation_rows(raw, rank, world) for raw in val_shard.iter_batches(
            batch_size=cfg.train.batch_size, batch_format="numpy"))
        batches = (to_model_batch(share, schema, device, cfg.train.channels_last) for share in shares
                   if share is not None)
        records = predict_cases(_unwrap(model), batches, phase.cross, structures, spacing, autocast)
        if world > 1:
            gathered: list[list[dict[str, Any]]] = [[] for _ in range(world)]
            dist.all_gather_object(gathered, records)
            records = [r for part in gathered for r in part]
        metrics = validation_metrics(records, structures, cfg.model.cdr_classes)
        score = combined_score(metrics, cfg.train.score)
        improved = not math.isnan(score) and score > best
        best, stale = (score, 0) if improved else (best, stale + 1)
        if cfg.train.patience is not None and stale >= cfg.train.patience:
            stop = True
        elapsed = time.perf_counter() - started
        metrics |= {f"train/{k}": v for k, v in epoch_losses.items()}
        metrics |= {f"weight/{k}": v for k, v in balancer.weights().items()}
        metrics |= {
            "epoch": epoch, "step": step, "nodes": nodes, "val/score": score, "lr": optimizer.param_groups[0]["lr"],
            "cross": phase.cross, "cases_per_s": world * cases / max(train_seconds, 1e-9), "elapsed_s": elapsed,
            "eta_s": elapsed / (epoch + 1) * (cfg.train.epochs - epoch - 1), "stopped": float(stop),
        }
        if tracker is not None:
            tracker.log(metrics, epoch)
        if rank == 0:
            print(epoch_line(metrics, cfg.train.epochs), flush=True)
            state = {
                "model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                "balancer": balancer.state_dict(), "scaler": scaler.state_dict() if scaler is not None else {},
                "epoch": epoch, "step": step, "best": best, "stale": stale, "elapsed_s": elapsed,
                "rng": _rng_state(),
            }
            with tempfile.TemporaryDirectory() as tmp:
                write_checkpoint(Path(tmp) / "ckpt", state, cfg, spec, schema, _finite(metrics),
                                 loop_config["trained_heads"])
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(Path(tmp) / "ckpt")),
                                 checkpoint_dir_name=f"epoch_{epoch:04d}")
        else:
            ray.train.report(metrics)
        epoch += 1
    if tracker is not None:
        tracker.close()


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
