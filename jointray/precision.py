"""Mixed precision per device: one rule for training and inference.

``precision="auto"`` picks bf16 autocast on CUDA devices that support it, fp16 (with a gradient
scaler, for training) on older GPUs, and fp32 on the CPU. bf16 on a CPU is opt-in (``"bf16"``, as
the MSD configuration does): it pays on CPUs with native bf16 instructions (AVX512-BF16, AMX), but
many CPUs lack them and would run it emulated, slower, so "auto" keeps fp32 there. Measured speed and
Dice of both: benchmarks/README.md (benchmarks/train.py, benchmarks/accuracy_msd.py).
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
