"""Refit the outcome heads of a finished run on the network's own features (decoupled head training).

In joint training the heads learn while the representation under them keeps moving, at the learning rate
of a 3D segmentation network, and from batches of a few cases. On real MRI that leaves them far from
fitted when a short budget ends: a v2 run's MMSE predictions on its own training cases spread a small
fraction as widely as the scores' linear predictor, while the same heads fitted afterwards on that run's
features came close to least squares on them (figures: benchmarks/README.md, joint learning on real MRI).

So, after training, the best checkpoint's heads are fitted again with the rest of the network frozen
(Kang et al., "Decoupling representation and classifier for long-tailed recognition", ICLR 2020;
Kirichenko et al., "Last layer re-training is sufficient for robustness to spurious correlations", ICLR
2023): the outcome representation h of every training case is computed once (no augmentation, dropout
off), and each head is trained on the cached h for ``train.refit.epochs`` passes in batches of
``train.refit.batch_size`` at ``train.refit.lr``, with its dropout on (Monte Carlo sampling at inference
relies on it). Each head keeps the state with the lowest validation loss of its own task, the trained
head included, so a refit never makes a head worse on the validation fold. Only the heads change: h,
and with it the segmentation (whose gates read h), stays exactly as trained.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import ray
import torch

from jointray.artifacts import read_checkpoint, write_checkpoint
from jointray.atomic_dir import staged_dir
from jointray.config import RefitConfig
from jointray.losses.joint import JointLoss
from jointray.metrics.cohort import validation_metrics
from jointray.models import build_model
from jointray.models.heads import OutcomeHeads
from jointray.models.layout import to_layout
from jointray.precision import autocast_for
from jointray.tasks import JointOutput, Targets
from jointray.train.batches import ModelBatch, to_model_batch
from jointray.train.validation import combined_score, predict_cases


@dataclass
class HeadData:
    """The outcome representation of N cases, hidden (N, D) float32, and their outcome targets."""

    hidden: torch.Tensor
    targets: Targets

    def take(self, index: torch.Tensor) -> HeadData:
        t = self.targets
        return HeadData(self.hidden[index], Targets(label=None, has_label=t.has_label[index], mmse=t.mmse[index],
                                                    cdr=t.cdr[index], time=t.time[index], event=t.event[index]))


def _head_keys(heads: OutcomeHeads, name: str) -> list[str]:
    """The state-dict keys of one head: its own trunk and output layer (and, for CDR, the ordered biases)."""
    return [k for k in heads.state_dict() if k.startswith((f"trunk.{name}.", f"out.{name}."))
            or (name == "cdr" and k == "cdr_bias")]


def _task_losses(heads: OutcomeHeads, loss_fn: JointLoss, data: HeadData, names: list[str]) -> dict[str, torch.Tensor]:
    losses = loss_fn(JointOutput(seg=None, outcomes=heads(data.hidden)), data.targets)
    return {k: v for k, v in losses.items() if k in names}


def fit_heads(heads: OutcomeHeads, loss_fn: JointLoss, train: HeadData, val: HeadData, names: list[str],
              cfg: RefitConfig, weight_decay: float, seed: int) -> dict[str, int]:
    """Train ``heads`` in place on cached representations; each head ends in its best state on ``val``.

    AdamW at ``cfg.lr`` with a cosine decay over the whole refit; every epoch a shuffled pass in batches of
    ``cfg.batch_size`` (a last batch of one case is dropped: a Cox loss needs two). Deterministic by
    ``seed`` (shuffling and dropout), without touching the caller's random state.

    Args:
        names: the heads to refit (those that saw targets in training).

    Returns:
        For each name, the epoch whose state the head kept: 0 is the state it came in with (kept when no
        epoch lowered its validation loss, or when the validation fold has no target for it).
    """
    def val_losses() -> dict[str, float]:
        heads.eval()
        with torch.no_grad():
            return {k: float(v) for k, v in _task_losses(heads, loss_fn, val, names).items()}

    incoming, losses = heads.state_dict(), val_losses()
    best = {name: (losses.get(name, math.nan), 0, {k: incoming[k].clone() for k in _head_keys(heads, name)})
            for name in names}
    optimizer = torch.optim.AdamW(heads.parameters(), lr=cfg.lr, weight_decay=weight_decay)
    steps = cfg.epochs * math.ceil(len(train.hidden) / cfg.batch_size)
    step = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for epoch in range(1, cfg.epochs + 1):
            heads.train()
            for index in torch.randperm(len(train.hidden)).split(cfg.batch_size):
                if len(index) < 2:
                    continue
                for group in optimizer.param_groups:
                    group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / steps))
                step += 1
                # A task without targets in the batch contributes a 0 connected to the graph.
                total = sum(_task_losses(heads, loss_fn, train.take(index), names).values())
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
            for name, loss in val_losses().items():
                if loss < best[name][0]:  # without validation targets a task's loss is 0 throughout: kept as is
                    state = heads.state_dict()
                    best[name] = (loss, epoch, {k: state[k].clone() for k in _head_keys(heads, name)})
    state = heads.state_dict()
    for _, _, kept in best.values():
        state |= kept
    heads.load_state_dict(state)
    heads.eval()
    return {name: epoch for name, (_, epoch, _) in best.items()}


@torch.no_grad()
def _head_data(model, batches: Iterator[ModelBatch], cross: float, autocast) -> HeadData:
    """h of every case, as inference computes it (eval mode, the training precision), on the model's device."""
    model.eval()
    hidden, targets = [], []
    for b in batches:
        with autocast():
            hidden.append(model.encode(b.image, b.clinical, cross, b.voxel_volume).hidden.float())
        targets.append(b.targets)
    joined = {name: torch.cat([getattr(t, name) for t in targets])
              for name in ("has_label", "mmse", "cdr", "time", "event")}
    return HeadData(torch.cat(hidden), Targets(label=None, **joined))


def refit_heads(folder: Path, train_ds: ray.data.Dataset, val_ds: ray.data.Dataset,
                announce: Callable[[str], None] = print) -> dict[str, float] | None:
    """Refit the heads of the training checkpoint in ``folder`` (switched in whole when done) and return its
    new metrics: the validation metrics recomputed with the refit heads, ``val/score`` with them, the
    epoch each head kept (``refit/<head>_epoch``) and the outcome metrics before the refit
    (``prerefit/val/...``). None, and the folder untouched, when ``train.refit.enabled`` is false or the
    model has no trained head.

    Runs in the calling process (the driver), on its GPU if it has one; reads the prepared training and
    validation cases once each, and the validation cases a second time to score the refit model.
    """
    checkpoint = read_checkpoint(folder)
    cfg, schema = checkpoint.config, checkpoint.schema
    if not cfg.train.refit.enabled or not checkpoint.trained_heads:
        return None
    model = to_layout(build_model(cfg.model, checkpoint.spec.channels, schema), cfg.train.channels_last)
    if model.heads is None:  # seg_only: the data has outcome targets, the model no heads
        return None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.load_state_dict(checkpoint.state["model"])
    model.to(device)
    autocast, _ = autocast_for(cfg.train.precision, device)
    cross = float(checkpoint.metrics.get("cross", 1.0))

    def batches(ds: ray.data.Dataset) -> Iterator[ModelBatch]:
        # In file order, as the workers read them: the same cases in the same batches in every run, so a
        # resumed run refits exactly as the uninterrupted one does. (The dataset's own context: a Dataset
        # keeps a copy of the one current when it was made.)
        ds.context.execution_options.preserve_order = True
        for raw in ds.iter_batches(batch_size=cfg.train.batch_size, batch_format="numpy"):
            yield to_model_batch(raw, schema, device, cfg.train.channels_last)

    heads = model.heads  # fp32 parameters; fit_heads runs without autocast
    train = _head_data(model, batches(train_ds), cross, autocast)
    val = _head_data(model, batches(val_ds), cross, autocast)
    kept = fit_heads(heads, JointLoss(cfg.model, cfg.train.loss), train, val, checkpoint.trained_heads,
                     cfg.train.refit, cfg.train.weight_decay, cfg.train.seed)
    structures = {k: v for k, v in cfg.data.label_names.items() if k != 0}
    records = predict_cases(model, batches(val_ds), cross, structures, autocast)
    before = checkpoint.metrics
    metrics = before | validation_metrics(records, structures, cfg.model.cdr_classes)
    metrics["val/score"] = combined_score(metrics, cfg.train.score)
    metrics |= {f"refit/{name}_epoch": float(epoch) for name, epoch in kept.items()}
    metrics |= {f"prerefit/{k}": v for k, v in before.items() if k.startswith("val/") and not k.startswith(
        ("val/dice", "val/hd95", "val/missed", "val/cases"))}
    metrics = {k: v for k, v in metrics.items() if math.isfinite(v)}  # as the loop writes them
    state = copy.copy(checkpoint.state)
    state["model"] = {k: v.cpu() for k, v in model.state_dict().items()}
    with staged_dir(Path(folder)) as staging:
        write_checkpoint(staging, state, cfg, checkpoint.spec, schema, metrics, checkpoint.trained_heads)
        read_checkpoint(staging)
    changed = ", ".join(f"{k.removeprefix('val/')} {before[k]:.3g} → {metrics[k]:.3g}"
                        for k in ("val/mmse_mae", "val/cdr_qwk", "val/c_index") if k in metrics and k in before)
    announce(f"refit the outcome heads on {len(train.hidden)} training cases' features "
             f"(kept epoch {', '.join(f'{n} {e}' for n, e in kept.items())} of {cfg.train.refit.epochs}): {changed}")
    return metrics
