"""The training recipe that Ray Train runs on every worker (one process each, DDP between them).

:meth:`JointTrainer.run` is the whole loop on one screen: each epoch trains on the worker's shard of
the training data (augmented in the worker, seeded per batch), validates on the worker's share of the
validation subjects, gathers the per-case results from every worker into metrics and the combined
score, and reports them with a checkpoint. A restarted worker group resumes from the latest
checkpoint exactly where the uninterrupted run would be: model, optimizer, balancer, scaler, counters
and every rank's random number generators are restored, and the data order and augmentation are
functions of (seed, epoch, rank, batch) alone.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from jointray.artifacts import read_checkpoint, write_checkpoint
from jointray.config import Config
from jointray.data.augment import AUGMENT, RESTART, SHUFFLE, Augmenter, stream_seed
from jointray.data.clinical import ClinicalSchema
from jointray.data.resident import ResidentShard
from jointray.data.spec import PreprocessSpec
from jointray.losses.joint import JointLoss
from jointray.metrics.cohort import validation_keys, validation_metrics
from jointray.models import build_model
from jointray.models.joint import JointModel
from jointray.models.layout import to_layout
from jointray.precision import autocast_for
from jointray.train.balancing import make_balancer
from jointray.train.batches import ModelBatch, to_model_batch
from jointray.train.curriculum import Curriculum, Phase
from jointray.train.progress import epoch_line
from jointray.train.tracking import Tracker
from jointray.train.update import guarded_update
from jointray.train.validation import combined_score, predict_cases

#: Cases kept in the local shuffle buffer of the training iterator.
SHUFFLE_BUFFER = 16


def lr_factor(step: int, warmup_steps: int, progress: float) -> float:
    """Linear warm-up to 1 over ``warmup_steps``, then cosine decay to 0 as ``progress`` goes 0 → 1."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def training_progress(step: int, total_steps: int, warmup_steps: int, elapsed_s: float, budget_s: float) -> float:
    """How far the run is, 0 → 1: by steps after the warm-up, or, with a wall-clock budget (finite
    ``budget_s``), by the time spent, so that the learning rate anneals to 0 and the curriculum ends its
    last phase exactly when the budget does, however many epochs fit in it."""
    if math.isfinite(budget_s):
        return min(1.0, elapsed_s / budget_s)
    return min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))


def threads_for(cpus: float) -> int:
    """Torch threads for a worker that holds ``cpus`` CPUs: as many, rounded up (1.5 → 2, 0.5 → 1)."""
    return max(1, math.ceil(cpus - 1e-9))


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's generators (Python, NumPy, torch CPU, and CUDA where used), as plain tensors and
    numbers so that the checkpoint loads with ``torch.load(weights_only=True)``."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def quiet_worker_logs(level: str) -> None:
    """``train.log_level`` for the loggers that print on every epoch inside a worker: Ray Data's, and
    those Ray modules that log under their file path rather than a dotted name (Train 2.60's report
    log records the whole metrics dict at INFO that way, out of reach of ``ray.train.LoggingConfig``)."""
    ray_dir = os.path.dirname(ray.__file__)
    for name in ["ray.data", *(n for n in logging.root.manager.loggerDict if n.startswith(ray_dir))]:
        logging.getLogger(name).setLevel(level)


@dataclass
class Comms:
    """This worker's place in the group; the collective helpers are no-ops for a single worker."""

    rank: int
    world: int
    device: torch.device

    def max(self, value: float) -> float:
        if self.world == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)  # NCCL reduces GPU tensors only
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return float(tensor)

    def gather(self, value: Any) -> list[Any]:
        if self.world == 1:
            return [value]
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, value)
        return gathered

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Mean of each value over workers (NaN where no worker saw the task)."""
        gathered = self.gather(values)
        keys = sorted(set().union(*gathered))
        return {k: float(np.nanmean([g.get(k, math.nan) for g in gathered])) for k in keys}

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        if self.world == 1:
            return
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=0)

    def owns(self, subject_id: str) -> bool:
        """Whether this rank validates ``subject_id``: disjoint and complete over ranks, whatever the read order."""
        return self.world == 1 or zlib.crc32(str(subject_id).encode()) % self.world == self.rank


class JointTrainer:
    """One worker's training run. ``loop_config`` comes from :func:`jointray.train.trainer.run_training`."""

    def __init__(self, loop_config: dict[str, Any]):
        self.cfg = Config.model_validate_json(loop_config["config"])
        self.spec = PreprocessSpec.model_validate_json(loop_config["spec"])
        self.schema = ClinicalSchema.model_validate_json(loop_config["schema"])
        self.loop_config = loop_config
        self.steps_per_epoch: int = loop_config["steps_per_epoch"]
        self.epoch, self.step, self.best, self.stale, self.elapsed_before = 0, 0, -math.inf, 0, 0.0
        self.stop = False
        self.resumed_from = -1  # the epoch of the checkpoint this attempt started from; -1: from scratch

    # -- the loop ------------------------------------------------------------------------------------

    def run(self) -> None:
        self.setup()
        train = self.cfg.train
        while (self.epoch < train.epochs or math.isfinite(self.budget_s)) and not self.stop:
            phase = self.curriculum.at(self.progress(self.epoch * self.steps_per_epoch, warmup=0))
            losses, cases, seconds, waited = self.train_epoch(phase)
            # A non-finite loss on any rank ends the run after this epoch (the driver reports it as an
            # error): its weights are garbage, and predicting with them proves nothing.
            # So does an epoch in which no step had a finite gradient (each was skipped: guarded_update).
            diverged = self.comms.max(float(not all(math.isfinite(v) for v in losses.values())
                                            or self.skipped == self.epoch_steps > 0)) > 0
            self.stop = self.stop or diverged
            # nnU-Net's "all" fold validates on training cases, which chooses nothing: only the last epoch
            # is scored (as the exported model's figures), and the time goes to training.
            last = self.stop or (not math.isfinite(self.budget_s) and self.epoch + 1 >= train.epochs)
            scored = not diverged and (train.fold != "all" or last)
            metrics = (self.validate(phase) if scored else self.unvalidated()) | self.replicas_in_sync()
            metrics["diverged"] = float(diverged)
            score = combined_score(metrics, train.score)
            improved = not math.isnan(score) and score > self.best
            self.best, self.stale = (score, 0) if improved else (self.best, self.stale + 1)
            self.stop = self.stop or (train.patience is not None and self.stale >= train.patience)
            elapsed = time.perf_counter() - self.started
            metrics |= {f"train/{k}": losses.get(k, math.nan) for k in self.tasks}
            metrics |= {f"weight/{k}": v for k, v in self.balancer.weights().items()}
            metrics |= {
                "epoch": self.epoch, "step": self.step, "nodes": self.nodes, "val/score": score,
                "lr": self.optimizer.param_groups[0]["lr"], "cross": phase.cross, "elapsed_s": elapsed,
                "cases_per_s": self.comms.world * cases / max(seconds, 1e-9), "stopped": float(self.stop),
                # The share of the epoch the slowest rank's training step stood waiting for its data (reading,
                # shuffling, and augmentation: all of it on a CPU, where it runs in line; on a GPU, what the
                # thread augmenting ahead did not hide). On a GPU, above a few per cent the data path starves it.
                "data_wait": self.comms.max(waited / max(seconds, 1e-9)),
                "eta_s": (max(0.0, self.budget_s - elapsed) if math.isfinite(self.budget_s)
                          else elapsed / (self.epoch + 1) * (train.epochs - self.epoch - 1)),
                "worker/cpus": self.cpus, "worker/threads": torch.get_num_threads(),
                "resumed_from_epoch": self.resumed_from,
                # Steps whose gradient was not finite, left unapplied (guarded_update; fp16's scaler skips its own).
                "skipped_steps": self.comms.max(float(self.skipped)),
            }
            self.save_checkpoint(metrics)
            self.epoch += 1
        if self.tracker is not None:
            self.tracker.close()

    # -- the parts -----------------------------------------------------------------------------------

    def setup(self) -> None:
        cfg, lc = self.cfg, self.loop_config
        quiet_worker_logs(cfg.train.log_level)
        context = ray.train.get_context()
        self.comms = Comms(context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device())
        rank, device = self.comms.rank, self.comms.device
        # Threads from the CPUs Ray gave this worker, not from the machine: concurrent runs (a search's
        # trials) each hold their share, and more threads than that would oversubscribe the cores.
        self.cpus = float(ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0))
        torch.set_num_threads(lc["threads"] or threads_for(self.cpus))
        torch.manual_seed(cfg.train.seed + rank)
        np.random.seed(cfg.train.seed + rank)
        random.seed(cfg.train.seed + rank)
        self.nodes = len(set(self.comms.gather(ray.get_runtime_context().get_node_id())))

        model = to_layout(build_model(cfg.model, self.spec.channels, self.schema), cfg.train.channels_last)
        # Only the tasks the training data has targets for are trained and balanced: a head without any
        # (an image-only dataset's outcomes) would add a constant 0 loss, and an adaptive balancer would shift
        # its weight onto the others.
        self.tasks = (["seg"] if model.decoder is not None else []) + (
            [h for h in model.cfg.heads if h in lc["trained_heads"]] if model.heads is not None else [])
        shared = model.encoder.levels[-1] if model.encoder is not None else model.to_hidden
        self.balancer = make_balancer(cfg.train.balancer, self.tasks, list(shared.parameters())).to(device)
        self.curriculum = Curriculum(cfg.train.curriculum, lr=cfg.train.lr)
        self.loss_fn = JointLoss(cfg.model, cfg.train.loss)
        self.model = ray.train.torch.prepare_model(model)
        self.optimizer = torch.optim.AdamW([
            {"params": [p for p in self.model.parameters() if p.requires_grad], "weight_decay": cfg.train.weight_decay},
            {"params": [p for p in self.balancer.parameters() if p.requires_grad], "weight_decay": 0.0},
        ], lr=cfg.train.lr)
        self.autocast, self.scaler = autocast_for(cfg.train.precision, device)
        # Polyak averaging (torch.optim.swa_utils): buffers too, so the average's normalisation statistics
        # belong to its own weights. Every rank updates it from identical weights, so it stays identical.
        self.ema = None if cfg.train.ema is None else AveragedModel(
            self.unwrapped, multi_avg_fn=get_ema_multi_avg_fn(cfg.train.ema), use_buffers=True)
        self.augment = Augmenter(cfg.train.augment) if cfg.train.augment.enabled else None
        self.resident: ResidentShard | None = None
        self.structures = {k: v for k, v in cfg.data.label_names.items() if k != 0}
        self.fault_marker = Path(lc["fault_marker"]) if lc.get("fault_marker") else None

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            self.load_checkpoint(checkpoint)
        self.tracker = Tracker(cfg, lc.get("tensorboard_dir"), lc.get("mlflow_uri"), checkpoint is not None,
                               lc.get("history_file")) \
            if rank == 0 else None
        self.total_steps = cfg.train.epochs * self.steps_per_epoch
        self.warmup_steps = int(cfg.train.warmup_epochs * self.steps_per_epoch)
        self.budget_s = cfg.train.max_minutes * 60 if cfg.train.max_minutes else math.inf
        self.started = time.perf_counter() - self.elapsed_before

    def train_epoch(self, phase: Phase) -> tuple[dict[str, float], int, float, float]:
        """One pass over this worker's shard: (mean loss per task over workers, cases, seconds, seconds the
        step waited for its batch)."""
        cfg, rank = self.cfg.train, self.comms.rank
        self.model.train()
        self.balancer.train()
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        cases, started = 0, time.perf_counter()
        self.skipped, self.epoch_steps = 0, 0
        shuffle = stream_seed(cfg.seed, SHUFFLE, self.epoch, rank)
        shard = ray.train.get_dataset_shard("train")
        if self.loop_config["resident"]:  # streamed once (after every start), then dealt from memory
            self.resident = self.resident or ResidentShard.gather(shard.iter_batches(batch_format="numpy"))
            batches = self.resident.batches(cfg.batch_size, shuffle)
        else:
            batches = shard.iter_batches(batch_size=cfg.batch_size, batch_format="numpy",
                                         local_shuffle_buffer_size=SHUFFLE_BUFFER, local_shuffle_seed=shuffle)
        if self.augment is not None:
            seed = lambda i: stream_seed(cfg.seed, AUGMENT, self.epoch, rank, i)  # noqa: E731
            # Ahead in a thread only where the step runs on a GPU: on the CPU the step's threads already fill
            # the worker's cores, and a second thread's torch work slows the step more than it hides.
            batches = (self.augment.ahead(batches, seed) if self.comms.device.type == "cuda"
                       else self.augment.in_line(batches, seed))
        waited, ready = 0.0, started
        for raw in batches:
            waited += time.perf_counter() - ready
            self.step += 1
            self.epoch_steps += 1
            self.inject_fault()
            elapsed = self.shared_elapsed()
            progress = training_progress(self.step - 1, self.total_steps, self.warmup_steps, elapsed, self.budget_s)
            for group in self.optimizer.param_groups:
                group["lr"] = phase.lr * lr_factor(self.step - 1, self.warmup_steps, progress)
            batch = to_model_batch(raw, self.schema, self.comms.device, cfg.channels_last)
            for name, value in self.train_step(batch, phase).items():
                sums[name] = sums.get(name, 0.0) + value * batch.size
                counts[name] = counts.get(name, 0) + batch.size
            cases += batch.size
            ready = time.perf_counter()
            if elapsed > self.budget_s:
                self.stop = True  # the budget is spent: validate and checkpoint this partial epoch, then end
                break
        seconds = time.perf_counter() - started
        # DDP averages gradients, not buffers: each rank's last forward updated its own BatchNorm running
        # statistics (the attention gates'). Every rank validates, and rank 0 saves, rank 0's.
        self.comms.broadcast_buffers(self.unwrapped)
        if self.ema is not None:
            self.comms.broadcast_buffers(self.ema.module)
        # Each rank's own means: a rank whose loss turned non-finite must not be averaged away.
        mine = {k: sums[k] / counts[k] for k in sums}
        losses = self.comms.mean(mine)
        if not all(math.isfinite(v) for v in mine.values()):
            losses = {k: math.nan for k in losses}
        self.balancer.epoch_end({k: v for k, v in losses.items() if math.isfinite(v)})
        return losses, cases, seconds, waited

    def train_step(self, batch: ModelBatch, phase: Phase) -> dict[str, float]:
        """Forward, balanced loss, backward, optimizer step: this batch's loss per task."""
        with self.autocast():
            out = self.model(batch.image, batch.clinical, phase.cross, batch.voxel_volume)
        losses = self.loss_fn(out, batch.targets)
        task_losses = {k: v for k, v in losses.items() if k in self.tasks}
        total = self.balancer(task_losses, scales=phase.scales(task_losses))
        if "correlation" in losses:
            total = total + losses["correlation"]
        # A head without targets has an exact 0 loss that still reaches its parameters: adding it keeps every
        # parameter in the graph, as DDP's gradient reducer expects of each step, and changes nothing else.
        total = total + sum(v for k, v in losses.items() if k not in self.tasks and k != "correlation")
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(total).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            total.backward()
        self.sync_balancer()
        applied = True
        if self.scaler is not None:  # fp16: the scaler skips a step whose gradient is not finite
            if self.cfg.train.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            applied = guarded_update(self.optimizer, self.model.parameters(), self.cfg.train.grad_clip)
            self.skipped += not applied
        if applied and self.ema is not None:
            self.ema.update_parameters(self.unwrapped)
        return {k: float(v.detach()) for k, v in task_losses.items()}

    @torch.no_grad()
    def validate(self, phase: Phase) -> dict[str, float]:
        """Metrics over every validation subject: each worker reads the whole (unsplit) validation set and
        predicts the subjects it owns, and the per-case records are gathered (an equal split would drop
        the remainder cases)."""
        comms, train = self.comms, self.cfg.train

        def mine():
            for raw in ray.train.get_dataset_shard("val").iter_batches(batch_size=train.batch_size,
                                                                         batch_format="numpy"):
                keep = np.array([comms.owns(s) for s in raw["subject_id"]])
                if keep.any():
                    yield to_model_batch({k: np.asarray(v)[keep] for k, v in raw.items()}, self.schema,
                                         comms.device, train.channels_last)

        records = predict_cases(self.served, mine(), phase.cross, self.structures, self.autocast)
        records = [r for part in comms.gather(records) for r in part]
        return self.unvalidated() | validation_metrics(records, self.structures, self.cfg.model.cdr_classes)

    def unvalidated(self) -> dict[str, float]:
        """Every validation metric as NaN: what a diverged epoch reports."""
        heads = list(self.cfg.model.heads) if self.unwrapped.heads is not None else []
        return dict.fromkeys(validation_keys(self.structures, "seg" in self.tasks, heads), math.nan)

    def save_checkpoint(self, metrics: dict[str, float]) -> None:
        """Report this epoch's metrics; rank 0 adds the checkpoint, which holds every rank's generators."""
        rngs = self.comms.gather(rng_state(self.comms.device))
        if self.tracker is not None:
            self.tracker.log(metrics, self.epoch)
        if self.comms.rank != 0:
            ray.train.report(metrics)
            return
        print(epoch_line(metrics, self.cfg.train.planned_epochs), flush=True)
        state = {
            "model": self.served.state_dict(), "optimizer": self.optimizer.state_dict(),
            "balancer": self.balancer.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else {},
            "epoch": self.epoch, "step": self.step, "best": self.best, "stale": self.stale,
            "elapsed_s": metrics["elapsed_s"], "rng": rngs,
        }
        if self.ema is not None:  # "model" is the average; training continues from these
            state |= {"training_model": self.unwrapped.state_dict(), "ema_updates": int(self.ema.n_averaged)}
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "ckpt"
            finite = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
            write_checkpoint(folder, state, self.cfg, self.spec, self.schema, finite,
                             self.loop_config["trained_heads"])
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)),
                             checkpoint_dir_name=f"epoch_{self.epoch:04d}")
        # The controller registers a report when it next polls the workers: a crash before that would
        # restart from the previous checkpoint. Waiting for the commit makes every saved epoch one a
        # restart continues from.
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)

    def load_checkpoint(self, checkpoint: ray.train.Checkpoint) -> None:
        """Continue after the checkpointed epoch, with this rank's own generators as they were then."""
        device = self.comms.device
        with checkpoint.as_directory() as folder:
            state = read_checkpoint(folder, map_location="cpu").state
        self.unwrapped.load_state_dict(state.get("training_model", state["model"]))
        if self.ema is not None:
            if "training_model" not in state:
                raise ValueError("train.ema is set, but the checkpoint to resume from was trained without it")
            self.ema.module.load_state_dict(state["model"])
            self.ema.n_averaged.fill_(state["ema_updates"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.balancer.load_state_dict(state["balancer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step, self.best, self.stale = state["epoch"] + 1, state["step"], state["best"], state["stale"]
        self.resumed_from = state["epoch"]
        self.elapsed_before = state["elapsed_s"]
        rngs = state["rng"]
        if len(rngs) == self.comms.world:
            set_rng_state(rngs[self.comms.rank], device)
        else:  # another worker count: the old streams cannot continue, so start new ones from the seed
            logging.getLogger(__name__).warning(
                "resuming %d workers from a checkpoint of %d: random streams restart from train.seed",
                self.comms.world, len(rngs))
            seed = stream_seed(self.cfg.train.seed, RESTART, self.epoch, self.comms.rank)
            torch.manual_seed(seed)
            np.random.seed(seed)
            random.seed(seed)

    # -- helpers -------------------------------------------------------------------------------------

    def replicas_in_sync(self) -> dict[str, float]:
        """``ddp/model_in_sync`` and ``ddp/balancer_in_sync``: 1.0 when every rank holds bit-identical
        weights (DDP's promise, and the balancer's, whose state lives outside DDP), else 0.0."""
        if self.comms.world == 1:
            return {}
        digests = {"model": _digest(self.unwrapped.state_dict()), "balancer": _digest(self.balancer.state_dict())}
        gathered = self.comms.gather(digests)
        return {f"ddp/{k}_in_sync": float(len({g[k] for g in gathered}) == 1) for k in digests}

    @property
    def unwrapped(self) -> JointModel:
        return self.model.module if hasattr(self.model, "module") else self.model

    @property
    def served(self) -> JointModel:
        """The weights that validation scores and checkpoints export: the moving average when ``train.ema``
        is set, else the trained weights."""
        return self.ema.module if self.ema is not None else self.unwrapped

    def progress(self, step: int, warmup: int) -> float:
        return training_progress(step, self.total_steps, warmup, self.shared_elapsed(), self.budget_s)

    def shared_elapsed(self) -> float:
        """Seconds of training, the same on every rank (the slowest clock), so that every worker takes the
        same learning rate, phase and decision to stop — a rank that stopped alone would leave the others
        waiting in DDP's all-reduce forever. Without a budget the clock decides nothing and is not shared."""
        elapsed = time.perf_counter() - self.started
        return elapsed if not math.isfinite(self.budget_s) else self.comms.max(elapsed)

    def sync_balancer(self) -> None:
        """Learnable balancer state lives outside DDP: average it across workers so every rank agrees."""
        world = self.comms.world
        if world == 1:
            return
        for tensor in self.balancer.parameters():
            if tensor.grad is not None:
                dist.all_reduce(tensor.grad)
                tensor.grad /= world
        if hasattr(self.balancer, "task_weights"):  # GradNorm updates its weights itself, from each rank's batch
            dist.all_reduce(self.balancer.task_weights.data)
            self.balancer.task_weights.data /= world

    def inject_fault(self) -> None:
        """Fault-tolerance testing: kill the rank-0 process at ``train.fault_at_step``, once per run."""
        at = self.cfg.train.fault_at_step or int(os.environ.get("JOINTRAY_FAULT_AT_STEP", "0")) or None
        marker = self.fault_marker
        if at is None or self.step != at or self.comms.rank != 0 or marker is None or marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"fault injected at step {self.step}\n")
        os._exit(1)  # a hard crash, as a lost node looks to Ray: no exception handling, no cleanup


def _digest(state: dict[str, Any]) -> str:
    sha = hashlib.sha256()
    for key, value in sorted(state.items()):
        sha.update(key.encode())
        if isinstance(value, torch.Tensor):
            sha.update(value.detach().cpu().contiguous().numpy().tobytes())
        else:  # the balancers' extra state: histories of floats
            sha.update(repr(value).encode())
    return sha.hexdigest()


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    JointTrainer(loop_config).run()
