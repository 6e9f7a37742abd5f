"""Monte Carlo dropout (Gal & Ghahramani 2016), vectorised over samples.

Three modes, one API; each trades segmentation uncertainty for cost:

- ``full``: T stochastic passes of the whole network (encoder spatial dropout, clinical and head
  dropout), run as batched forwards of size T·B.
- ``decoder``: the image encoder runs once, deterministically; dropout is sampled on its features
  (each level's own dropout, :meth:`~jointray.models.encoder.ImageEncoder.sample_dropout`) and
  everything after the encoder — fusion, decoder, outcome heads — runs on the T·B tiled features.
  Segmentation keeps a spread at a fraction of ``full``'s cost.
- ``heads``: the trunk (encoder and decoder) runs once; only the outcome heads are sampled, on the
  hidden representation tiled T times. About the cost of one pass; segmentation has no spread.

Normalisation layers stay in inference mode in every mode: only dropout is stochastic.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn

from jointray.data.clinical import ClinicalInput
from jointray.models.joint import JointModel
from jointray.tasks import JointOutput

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
MC_MODES = ("full", "decoder", "heads")
MCMode = Literal["full", "decoder", "heads"]


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


def _tile(x: torch.Tensor, times: int) -> torch.Tensor:
    """(B, ...) → (times·B, ...), sample-major like ``Tensor.repeat``."""
    return x.repeat(times, *([1] * (x.ndim - 1)))


class MCSampler:
    """Monte Carlo samples for one batch of B cases, drawn in as many calls as the caller likes.

    The deterministic part of the chosen mode (nothing for ``full``, the encoder for ``decoder``, the
    trunk for ``heads``) runs once, in the constructor; each :meth:`draw` then costs only the stochastic
    part, so a caller can bound memory by drawing T samples in chunks without repeating shared work.
    ``encoded``: for ``heads``, the deterministic :meth:`JointModel.encode` output if the caller has it.
    """

    @torch.no_grad()
    def __init__(self, model: JointModel, image: torch.Tensor | None, clinical: ClinicalInput | None,
                 mode: MCMode = "full", cross: float = 1.0, voxel_volume: torch.Tensor | None = None,
                 encoded: JointOutput | None = None):
        if mode not in MC_MODES:
            raise ValueError(f"MC mode must be one of {MC_MODES}, got {mode!r}")
        self.model, self.image, self.clinical, self.mode = model, image, clinical, mode
        self.cross, self.voxel_volume = cross, voxel_volume
        ref = image if image is not None else clinical.numeric
        self.batch = ref.shape[0]
        if mode == "decoder" and model.encoder is None:
            self.mode = "full"  # nothing to run once: a clinical-only model samples its heads
        self.features = self.encoded = None
        training = model.training
        model.eval()
        try:
            if self.mode == "decoder":
                self.features = model.encoder(image)
            elif self.mode == "heads":
                self.encoded = encoded or model.encode(image, clinical, cross, voxel_volume)
        finally:
            model.train(training)

    @torch.no_grad()
    def draw(self, samples: int) -> dict[str, torch.Tensor]:
        """``samples`` (T) draws: ``seg_probs`` (T, B, K, X, Y, Z) — (1, B, ...) in ``heads`` mode, absent
        for a model without segmentation — and each outcome as (T, B), or (T, B, K-1) CORAL logits for ``cdr``."""
        model, batch = self.model, self.batch
        result: dict[str, torch.Tensor] = {}
        with dropout_only(model):
            if self.mode == "heads":
                if self.encoded.seg is not None:
                    result["seg_probs"] = torch.softmax(self.encoded.seg[0].float(), 1).unsqueeze(0)
                outcomes = model.heads(_tile(self.encoded.hidden, samples)) if model.heads is not None else {}
            else:
                image = _tile(self.image, samples) if self.image is not None else None
                clinical = self.clinical.repeat(samples) if self.clinical is not None else None
                volume = _tile(self.voxel_volume, samples) if self.voxel_volume is not None else None
                features = None
                if self.features is not None:
                    features = model.encoder.sample_dropout([_tile(f, samples) for f in self.features])
                out = model.encode(image, clinical, self.cross, volume, features=features)
                outcomes = model.heads(out.hidden) if model.heads is not None else {}
                if out.seg is not None:
                    probs = torch.softmax(out.seg[0].float(), 1)
                    result["seg_probs"] = probs.view(samples, batch, *probs.shape[1:])
        for name, value in outcomes.items():
            result[name] = value.view(samples, batch, *value.shape[1:])
        return result


def mc_sample(model: JointModel, image: torch.Tensor | None, clinical: ClinicalInput | None, samples: int,
              mode: MCMode = "full", cross: float = 1.0,
              voxel_volume: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Draw ``samples`` (T) Monte Carlo samples for a batch of B cases in one call (see :class:`MCSampler`)."""
    return MCSampler(model, image, clinical, mode, cross, voxel_volume).draw(samples)
