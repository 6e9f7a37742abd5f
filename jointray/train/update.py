"""The optimizer update of one training step, refused when the gradient is not finite."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def guarded_update(optimizer: torch.optim.Optimizer, params: Iterable[torch.nn.Parameter],
                   grad_clip: float | None) -> bool:
    """Clip the gradients of ``params`` to norm ``grad_clip`` (None: no clipping), then step ``optimizer``;
    but when their norm is not finite, leave weights and optimizer state as they were and return False.

    Why: one inf or NaN in a gradient (an overflow, or a faulty kernel: torch 2.13's CPU bf16 Conv3d weight
    gradient now and then returns values near float32's limit for some small inputs, e.g. a (4, 128, 2, 4, 3)
    bottleneck) would otherwise reach the weights, where clipping turns it into NaN
    (its factor is max_norm / inf = 0, and 0 · inf = NaN), and every later step stays NaN. fp16 training has
    this guard in its ``GradScaler``; bf16 and fp32 have no scaler, so the loop checks here. A loss that
    is itself non-finite is not this function's concern: the loop ends such a run as diverged.

    Under DDP the gradients are already averaged over the ranks, so every rank decides alike.
    """
    params = [p for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if not math.isfinite(float(norm)):
        return False
    if grad_clip is not None:
        torch.nn.utils.clip_grads_with_norm_(params, grad_clip, norm)
    optimizer.step()
    return True
