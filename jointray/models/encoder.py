"""Shared 3D image encoder: residual units with instance norm, squeeze-excitation and spatial dropout."""

from __future__ import annotations

import torch
from monai.networks.blocks import ChannelSELayer, ResidualUnit
from torch import nn


class EncoderLevel(nn.Module):
    """One resolution level: a strided residual unit, optional SE, spatial dropout.

    Spatial dropout (``Dropout3d``, whole channels) rather than voxel dropout: neighbouring voxels are
    strongly correlated, so only channel dropout gives meaningfully different Monte Carlo samples
    (Tompson et al. 2015, "Efficient object localization using convolutional networks").

    ``act``: the residual unit's activation, a MONAI spec (``model.activation``, see
    :data:`jointray.models.joint.ACTIVATIONS`).

    (B, C_in, X, Y, Z) → (B, C_out, X/s, Y/s, Z/s)
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, squeeze_excite: bool, dropout: float,
                 act: str | tuple):
        super().__init__()
        self.unit = ResidualUnit(3, in_channels, out_channels, strides=stride, subunits=2, norm="INSTANCE", act=act)
        # Hu et al. 2018, "Squeeze-and-excitation networks": channel attention at negligible cost.
        self.se = ChannelSELayer(3, out_channels, r=4) if squeeze_excite else nn.Identity()
        self.drop = nn.Dropout3d(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.se(self.unit(x)))


class ImageEncoder(nn.Module):
    """A pyramid of :class:`EncoderLevel`; returns the features of every level, finest first.

    (B, C_in, X, Y, Z) → [(B, c_0, X/2, Y/2, Z/2), (B, c_1, X/4, ...), ..., (B, c_L, X/2^(L+1), ...)]

    Every level, the first included, halves the grid (as MONAI's UNet does): 3×3×3 convolutions with
    16+ channels at full resolution would cost most of the network's FLOPs for little gain, so full
    resolution is reached only by the decoder's light output stage. No dropout at the first level:
    it would only add noise to the skip connection that carries boundary detail.
    """

    def __init__(self, in_channels: int, channels: tuple[int, ...], squeeze_excite: bool, dropout: float,
                 act: str | tuple):
        super().__init__()
        widths = (in_channels, *channels)
        self.levels = nn.ModuleList(
            EncoderLevel(widths[i], widths[i + 1], stride=2, squeeze_excite=squeeze_excite,
                         dropout=0.0 if i == 0 else dropout, act=act)
            for i in range(len(channels))
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for level in self.levels:
            x = level(x)
            features.append(x)
        return features

    def sample_dropout(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each level's dropout applied to that level's features (the identity in eval mode).

        On features computed in eval mode this is Monte Carlo ``decoder`` mode's approximation of a full
        stochastic pass: every level's output is dropped as in training, but each level reads its
        predecessor's undropped (expected) output.
        """
        return [level.drop(f) for level, f in zip(self.levels, features)]


class ConsensusFusion(nn.Module):
    """Fuse per-view features of one level into one map by a learned, voxel-wise soft consensus.

    Each view proposes features; a 1×1×1 convolution over their concatenation scores each view per
    voxel, and a softmax across views weighs them. Where the views agree the result is their mean;
    where one view is uninformative (artefact, missing contrast) the other dominates.

    V × (B, C, X, Y, Z) → (B, C, X, Y, Z)
    """

    def __init__(self, channels: int, views: int):
        super().__init__()
        self.score = nn.Conv3d(channels * views, views, kernel_size=1)

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        stacked = torch.stack(views, dim=1)  # (B, V, C, X, Y, Z)
        weights = torch.softmax(self.score(torch.cat(views, dim=1)), dim=1).unsqueeze(2)  # (B, V, 1, X, Y, Z)
        return (weights * stacked).sum(dim=1)


class DualViewEncoder(nn.Module):
    """One :class:`ImageEncoder` per view (or modality), fused level by level with :class:`ConsensusFusion`.

    (B, V, X, Y, Z) → the same pyramid as :class:`ImageEncoder`.
    """

    def __init__(self, views: int, channels: tuple[int, ...], squeeze_excite: bool, dropout: float,
                 act: str | tuple):
        super().__init__()
        self.encoders = nn.ModuleList(ImageEncoder(1, channels, squeeze_excite, dropout, act) for _ in range(views))
        self.fusions = nn.ModuleList(ConsensusFusion(c, views) for c in channels)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        per_view = [enc(x[:, v : v + 1]) for v, enc in enumerate(self.encoders)]
        return [fuse([f[level] for f in per_view]) for level, fuse in enumerate(self.fusions)]

    def sample_dropout(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """:meth:`ImageEncoder.sample_dropout` on the fused features (every view drops at the same rate)."""
        return self.encoders[0].sample_dropout(features)
