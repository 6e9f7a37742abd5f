"""Monte Carlo dropout (Gal & Ghahramani 2016), vectorised over samples.

Two modes, one API:
- ``full``: T stochastic passes of the whole network (encoder spatial dropout and head dropout), run
  as ONE batched forward of size T·B — segmentation and outcomes both get uncertainty.
- ``heads``: the encoder and decoder run once, deterministically; only the outcome heads are sampled,
  on the hidden representation tiled T times. Roughly the cost of one pass; segmentation has no
  spread in this mode.

Normalisation layers stay in inference mode in both: only dropout is stochastic.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn

from jointray.data.clinical import ClinicalInput
from jointray.models.joint import JointModel

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


@contextmanager
def dropout_only(module: nn.Module) -> Iterator[None]:
    """Evaluation mode for everything except the dropout layers of ``module``; restores the modes after."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    for m in module.modules():
        if isinstance(m, _DROPOUT):
            m.train()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.train(mode)


@torch.no_grad()
def mc_sample(model: JointModel, image: torch.Tensor | None, clinical: ClinicalInput | None, samples: int,
              mode: Literal["full", "heads"] = "full", cross: float = 1.0,
              voxel_volume: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Draw ``samples`` (T) Monte Carlo samples for a batch of B cases.

    Returns ``seg_probs`` (T, B, K, X, Y, Z) — (1, B, ...) in ``heads`` mode — and each outcome as
    (T, B) or (T, B, K-1) for ``cdr`` logits.
    """
    if mode not in ("full", "heads"):
        raise ValueError(f"MC mode must be 'full' or 'heads', got {mode!r}")
    ref = image if image is not None else clinical.numeric
    batch = ref.shape[0]
    result: dict[str, torch.Tensor] = {}
    if mode == "full":
        tiled_image = image.repeat(samples, *([1] * (image.ndim - 1))) if image is not None else None
        tiled_clinical = clinical.repeat(samples) if clinical is not None else None
        tiled_volume = voxel_volume.repeat(samples) if voxel_volume is not None else None
        with dropout_only(model):
            out = model(tiled_image, tiled_clinical, cross, tiled_volume)
        if out.seg is not None:
            result["seg_probs"] = torch.softmax(out.seg[0].float(), 1).view(samples, batch, *out.seg[0].shape[1:])
        for name, value in out.outcomes.items():
            result[name] = value.view(samples, batch, *value.shape[1:])
        return result
    with dropout_only(model):
        model.eval()  # the shared trunk runs once, deterministically
        out = model.encode(image, clinical, cross, voxel_volume)
        if out.seg is not None:
            result["seg_probs"] = torch.softmax(out.seg[0].float(), 1).unsqueeze(0)
        if model.heads is not None:
            with dropout_only(model.heads):
                outcomes = model.heads(out.hidden.repeat(samples, 1))
            for name, value in outcomes.items():
                result[name] = value.view(samples, batch, *value.shape[1:])
    return result
