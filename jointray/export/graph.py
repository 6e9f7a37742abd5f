"""The joint model as a graph with plain tensor inputs and outputs: what ONNX and TorchScript can hold.

:class:`JointGraph` wraps a :class:`~jointray.models.joint.JointModel` for export::

    inputs   image (B, C, X, Y, Z) float32, numeric (B, Fn) float32, missing (B, Fn) bool,
             categorical (B, Fc) int64, voxel_volume (B,) float32 mm³
    outputs  seg (B, K, X, Y, Z) float32 logits (models with a decoder), then one output per outcome
             head in ``model.cfg.heads`` order: mmse (B,), cdr (B, K_cdr - 1) CORAL logits, risk (B,)

The cross-task strength λ the checkpoint was trained to is a constant of the graph, not an input.

Monte Carlo dropout needs dropout at inference, which an exported inference graph does not have (the
exporters drop it in eval mode). :func:`stochastic_copy` swaps every dropout layer for
:class:`AlwaysDropout`, dropout written with ``rand_like``, which exports as ONNX ``RandomUniformLike``
and is traced as such by TorchScript: each run of that graph is one Monte Carlo sample of the whole
network (mode ``full``); a batch of T·B tiled inputs draws T samples at once, as
:class:`~jointray.models.mc.MCSampler` does.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from jointray.data.clinical import ClinicalInput
from jointray.models.joint import JointModel

INPUT_NAMES = ("image", "numeric", "missing", "categorical", "voxel_volume")


def output_names(model: JointModel) -> list[str]:
    """The graph's outputs, in order: ``seg`` for a model with a decoder, then its outcome heads."""
    heads = list(model.cfg.heads) if model.heads is not None else []
    return (["seg"] if model.decoder is not None else []) + heads


class JointGraph(nn.Module):
    """``model``'s inference forward (:meth:`JointModel.forward` at strength ``cross``) on plain tensors."""

    def __init__(self, model: JointModel, cross: float):
        super().__init__()
        self.model, self.cross = model, float(cross)
        self.names = output_names(model)

    def forward(self, image: torch.Tensor, numeric: torch.Tensor, missing: torch.Tensor, categorical: torch.Tensor,
                voxel_volume: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(image, ClinicalInput(numeric, missing, categorical), self.cross, voxel_volume)
        outputs = [out.seg[0]] if out.seg is not None else []
        return tuple(outputs + [out.outcomes[name] for name in self.names if name != "seg"])


class AlwaysDropout(nn.Module):
    """Dropout that is on in eval mode too, elementwise (``nn.Dropout``) or of whole channels
    (``nn.Dropout1d/2d/3d``: one draw per (sample, channel), broadcast over the spatial axes)."""

    def __init__(self, p: float, channelwise: bool):
        super().__init__()
        self.p, self.channelwise = float(p), channelwise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0:
            return x
        shape = x[(slice(None), slice(None)) + (slice(0, 1),) * (x.dim() - 2)] if self.channelwise else x
        keep = (torch.rand_like(shape) >= self.p).to(x.dtype)
        return x * keep / (1.0 - self.p)


def stochastic_copy(model: JointModel) -> JointModel:
    """A copy of ``model`` (in eval mode) whose every dropout layer samples at inference: the Monte Carlo graph."""
    clone = copy.deepcopy(model).eval()
    for parent in clone.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Dropout):
                setattr(parent, name, AlwaysDropout(child.p, channelwise=False))
            elif isinstance(child, (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)):
                setattr(parent, name, AlwaysDropout(child.p, channelwise=True))
    return clone


def example_inputs(model: JointModel, in_channels: int, shape: tuple[int, int, int], batch: int = 2,
                   num_numeric: int = 0, num_categorical: int = 0) -> tuple[torch.Tensor, ...]:
    """Inputs of the graph's shapes (random image, all-missing clinical record), for tracing."""
    return (torch.randn(batch, in_channels, *shape), torch.zeros(batch, num_numeric),
            torch.ones(batch, num_numeric, dtype=torch.bool), torch.zeros(batch, num_categorical, dtype=torch.long),
            torch.ones(batch))
