"""Mixed precision per device: one rule for training and inference.

``precision="auto"`` picks bf16 autocast on CUDA devices that support it, fp16 (with a gradient
scaler, for training) on older GPUs, and fp32 on the CPU. On this AVX512-BF16 CPU, with channels-last
convolutions, bf16 autocast trained ``v2`` 1.15× faster than fp32 (benchmarks/train.py), and on MSD
hippocampus it gave fp32's Dice (0.8797 vs 0.8796 mirrored, benchmarks/accuracy_msd.py); the MSD
configuration opts in.
"auto" still means fp32 on CPUs: many lack native bf16 and would run it emulated, slower.
"""

from __future__ import annotations

import contextlib

import torch


def autocast_for(precision: str, device: torch.device):
    """(autocast context factory, GradScaler or None) for ``precision`` ("auto", "fp32", "bf16", "fp16") on ``device``."""
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "fp32"
    if precision == "fp32":
        return contextlib.nullcontext, None
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler
