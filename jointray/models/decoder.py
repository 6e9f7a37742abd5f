"""Segmentation decoder: attention-gated skip connections, channel gating, deep supervision."""

from __future__ import annotations

import torch
from monai.networks.blocks import Convolution, ResidualUnit
from monai.networks.nets.attentionunet import AttentionBlock
from torch import nn


def _up(in_channels: int, out_channels: int, act: str | tuple) -> Convolution:
    return Convolution(3, in_channels, out_channels, strides=2, kernel_size=2, is_transposed=True,
                       norm="INSTANCE", act=act, padding=0, output_padding=0)


class DecoderLevel(nn.Module):
    """Upsample, gate the skip connection, merge, refine.

    The attention gate (Oktay et al. 2018, "Attention U-Net") lets the coarser decoder features decide
    which skip voxels matter, suppressing look-alike tissue next to the hippocampus.

    x (B, C_in, X/2, ...), skip (B, C_out, X, ...) → (B, C_out, X, ...)
    """

    def __init__(self, in_channels: int, out_channels: int, attention_gate: bool, act: str | tuple):
        super().__init__()
        self.out_channels = out_channels
        self.up = _up(in_channels, out_channels, act)
        self.gate = AttentionBlock(3, f_int=max(out_channels // 2, 4), f_g=out_channels, f_l=out_channels) \
            if attention_gate else None
        self.merge = ResidualUnit(3, 2 * out_channels, out_channels, subunits=1, norm="INSTANCE", act=act)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        if self.gate is not None:
            skip = self.gate(g=x, x=skip)
        return self.merge(torch.cat([x, skip], dim=1))


class SegmentationDecoder(nn.Module):
    """Decode an encoder pyramid to class logits at full, 1/2 and 1/4 resolution (deep supervision).

    The encoder's finest level is at 1/2 resolution; a transposed convolution brings the decoder to
    full resolution with ``full_res_channels`` channels, where the input image is concatenated back in
    (boundary detail at full resolution). Then either one 3×3×3 classifier (as cheap as MONAI UNet's top
    level) or, with ``full_res_unit``, one residual unit at full resolution and a 1×1×1 classifier: more
    capacity where thin structures (the hippocampal tail is 2–3 voxels across) are decided, at a cost
    (every full-resolution voxel counts; few-channel 3D convolutions are the least efficient kind on CPUs).

    ``act``: the activation of every upsampling and residual block, a MONAI spec (``model.activation``).

    ``gates`` (optional) are per-level channel multipliers (B, C_level) from the outcome branch
    (outcome → segmentation interaction); 1 everywhere means no effect.

    features [(B, c_0, X/2, ...), ..., (B, c_L, X/2^(L+1), ...)], image (B, C_in, X, ...)
    → logits [(B, K, X, ...), (B, K, X/2, ...), (B, K, X/4, ...)]
    """

    def __init__(self, channels: tuple[int, ...], in_channels: int, num_classes: int, attention_gates: bool,
                 full_res_channels: int, full_res_unit: bool, act: str | tuple):
        super().__init__()
        self.levels = nn.ModuleList(
            DecoderLevel(channels[i + 1], channels[i], attention_gates, act) for i in reversed(range(len(channels) - 1))
        )
        self.to_full = _up(channels[0], full_res_channels, act)
        merged = full_res_channels + in_channels
        if full_res_unit:
            self.refine = ResidualUnit(3, merged, full_res_channels, subunits=1, norm="INSTANCE", act=act)
            classifier = nn.Conv3d(full_res_channels, num_classes, kernel_size=1)
        else:
            self.refine = nn.Identity()
            classifier = nn.Conv3d(merged, num_classes, kernel_size=3, padding=1)
        self.heads = nn.ModuleList([
            classifier,
            nn.Conv3d(channels[0], num_classes, kernel_size=1),
            nn.Conv3d(channels[1], num_classes, kernel_size=1),
        ])

    @property
    def gated_channels(self) -> list[int]:
        return [level.out_channels for level in self.levels]

    def forward(self, features: list[torch.Tensor], image: torch.Tensor,
                gates: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        x = features[-1]
        outputs = []
        for i, level in enumerate(self.levels):
            x = level(x, features[-2 - i])
            if gates is not None:
                x = x * gates[i].view(*gates[i].shape, 1, 1, 1)
            outputs.append(x)
        full = self.refine(torch.cat([self.to_full(x), image], dim=1))
        logits = [self.heads[0](full), self.heads[1](x), self.heads[2](outputs[-2])]
        return logits
