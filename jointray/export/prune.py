"""Magnitude pruning with a short fine-tune (``torch.nn.utils.prune``).

Global unstructured L1 pruning (Han et al. 2015, "Learning both Weights and Connections"): the
``fraction`` of the smallest weights across every convolution, transposed convolution and linear layer
is set to zero — globally, so layers with many redundant weights give up more — then the model is
fine-tuned for a few steps with the zeros held (the pruning masks stay on during the fine-tune) and the
masks are made permanent. Norms, PReLU slopes and biases are not pruned.

Zeros make a model smaller only once compressed, and faster only on kernels that skip them; the dense
convolutions of PyTorch and onnxruntime do not. Structured pruning (whole channels) would save time, but
only by rebuilding every layer that reads a pruned channel — in this U-Net the residual units, skip
connections, squeeze-excitation and attention gates — which this module does not do.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune

from jointray.config import Config
from jointray.data.clinical import ClinicalSchema
from jointray.losses.joint import JointLoss
from jointray.models.joint import JointModel
from jointray.train.batches import to_model_batch

PRUNABLE = (nn.Conv3d, nn.ConvTranspose3d, nn.Linear)


def prunable_weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """The weights pruning reaches. Not attention's output projection: ``nn.MultiheadAttention`` reads its
    weight directly instead of calling it, so the pruning hook, which runs on a call, would never apply."""
    attention = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    return [(m, "weight") for m in model.modules() if isinstance(m, PRUNABLE) and id(m) not in attention]


def sparsity(model: nn.Module) -> float:
    """Share of zeros among the prunable weights."""
    weights = [getattr(m, name).detach() for m, name in prunable_weights(model)]
    return float(sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights))


def prune_and_finetune(model: JointModel, fraction: float, cases: dict[str, np.ndarray], cfg: Config,
                       schema: ClinicalSchema, tasks: list[str], cross: float, steps: int, lr: float,
                       seed: int = 0) -> dict[str, Any]:
    """Prune ``fraction`` of ``model``'s weights (in place) and fine-tune it on ``cases`` (prepared shard rows,
    :func:`jointray.data.streaming.read_subjects`, unaugmented) for ``steps`` AdamW steps of
    ``cfg.train.batch_size`` cases on the unweighted sum of the ``tasks``' losses (``cfg.train.loss``);
    returns the sparsity and the fine-tune's mean loss over its first and last tenth of steps."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"prune fraction must lie strictly between 0 and 1, got {fraction}")
    targets = prunable_weights(model)
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=fraction)
    loss_fn = JointLoss(model.cfg, cfg.train.loss)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    generator = np.random.default_rng(seed)
    size = len(cases["subject_id"])
    order = itertools.chain.from_iterable(generator.permutation(size) for _ in itertools.count())
    losses = []
    model.train()
    for _ in range(steps):
        pick = np.array([next(order) for _ in range(min(cfg.train.batch_size, size))])
        batch = to_model_batch({k: v[pick] for k, v in cases.items()}, schema, "cpu")
        out = model(batch.image, batch.clinical, cross, batch.voxel_volume)
        parts = loss_fn(out, batch.targets)
        total = sum(parts[t] for t in tasks if t in parts)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        losses.append(float(total.detach()))
    model.eval()
    for module, name in targets:
        prune.remove(module, name)  # the masked weights become the weights; the zeros stay zeros
    tenth = max(1, steps // 10)
    return {"fraction": fraction, "method": "global L1 unstructured (conv, transposed conv, linear weights)",
            "sparsity": sparsity(model), "finetune_steps": steps, "finetune_lr": lr, "finetune_cases": size,
            "finetune_loss_first": float(np.mean(losses[:tenth])) if losses else None,
            "finetune_loss_last": float(np.mean(losses[-tenth:])) if losses else None}

