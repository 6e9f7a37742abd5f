"""Memory layout of the 3D convolutions: channels-last (N, X, Y, Z, C in memory) or PyTorch's default.

oneDNN's CPU kernels and cuDNN's tensor-core kernels both prefer channels-last for 3D convolution
(measured speed-up: benchmarks/README.md). The model's weights and its image input are converted once
each; the outputs keep whichever layout the kernels chose, which every consumer (losses, argmax,
metrics) accepts.
"""

from __future__ import annotations

import torch
from torch import nn


def to_layout(model: nn.Module, channels_last: bool) -> nn.Module:
    """``model`` with its 5D parameters in channels-last layout when ``channels_last`` (in place).

    1×1×1 kernels stay contiguous: for them both layouts hold the same values in the same order, but
    autograd returns their gradients with contiguous strides, and DDP warns (and copies) when a
    gradient's strides differ from its bucket view's.
    """
    if not channels_last:
        return model
    model.to(memory_format=torch.channels_last_3d)
    for parameter in model.parameters():
        if parameter.dim() == 5 and parameter.shape[2:] == (1, 1, 1):
            # clone, not contiguous(): that returns the tensor as it is, whose strides count as both
            parameter.data = parameter.data.clone(memory_format=torch.contiguous_format)
    return model


def image_in_layout(image: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """A (B, C, X, Y, Z) image in the layout its model expects."""
    return image.contiguous(memory_format=torch.channels_last_3d) if channels_last else image
