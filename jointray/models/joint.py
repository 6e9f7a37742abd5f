"""The joint model: one network, five variants chosen by ``model.variant``.

Data flow (v2)::

    image ─ encoder (SE, spatial dropout) ─ pyramid ─┬─ bottleneck ─ FiLM(c) ─ cross-attention(tokens)
    clinical ─ ClinicalEncoder ─ c, tokens ──────────┘          │
                                                     h0 = MLP[GAP(bottleneck), c]
                                  gates = 1 + λ·tanh(W h0) ──►  decoder (attention-gated skips) ─ logits ×3
                                                     h = h0 + W' std(log structure volumes(logits))
                                                     heads(h) → mmse, cdr, risk

λ (``cross``, from the curriculum) scales the outcome → segmentation gates; λ = 0 switches them off.
The segmentation → outcome path (the predicted volumes, detached) is always on: it cannot move the mask.

| variant       | encoder       | SE | attention gates | FiLM + cross-attn | cross-task | seg | outcomes |
|---------------|---------------|----|-----------------|-------------------|------------|-----|----------|
| v2            | shared        | ✓  | ✓               | ✓                 | ✓          | ✓   | ✓        |
| dv            | one per view  | ✓  | ✓               | ✓                 | ✓          | ✓   | ✓        |
| dv1           | shared, plain |    |                 | (concatenation)   |            | ✓   | ✓        |
| seg_only      | shared        | ✓  | ✓               |                   |            | ✓   |          |
| outcome_only  | shared or none| ✓  |                 | ✓                 |            |     | ✓        |
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from jointray.config import ModelConfig
from jointray.data.clinical import ClinicalInput, ClinicalSchema
from jointray.models.clinical import ClinicalEncoder
from jointray.models.decoder import SegmentationDecoder
from jointray.models.encoder import DualViewEncoder, ImageEncoder
from jointray.models.fusion import ClinicalCrossAttention, FiLM
from jointray.models.heads import OutcomeHeads, StructureVolumes
from jointray.models.standardize import RunningStandardize
from jointray.tasks import JointOutput

#: Width of the shared outcome representation h.
OUTCOME_DIM = 128

#: ``model.activation`` → MONAI's activation spec for every convolution block of the encoder and decoder.
#: PReLU: MONAI's default. Leaky ReLU with slope 0.01: nnU-Net's (Isensee et al., Nature Methods 2021), and
#: cheaper to train on a CPU (PReLU's backward pass reduces its gradient over every voxel).
ACTIVATIONS: dict[str, str | tuple] = {"prelu": "PRELU", "leakyrelu": ("LEAKYRELU", {"negative_slope": 0.01})}


@dataclass(frozen=True)
class VariantSpec:
    segmentation: bool
    outcomes: bool
    dual_view: bool = False
    squeeze_excite: bool = True
    attention_gates: bool = True
    clinical_fusion: bool = True  # FiLM + cross-attention on the bottleneck
    cross_task: bool = True


VARIANTS = {
    "v2": VariantSpec(segmentation=True, outcomes=True),
    "dv": VariantSpec(segmentation=True, outcomes=True, dual_view=True),
    "dv1": VariantSpec(segmentation=True, outcomes=True, squeeze_excite=False, attention_gates=False,
                       clinical_fusion=False, cross_task=False),
    "seg_only": VariantSpec(segmentation=True, outcomes=False, clinical_fusion=False, cross_task=False),
    "outcome_only": VariantSpec(segmentation=False, outcomes=True, attention_gates=False, cross_task=False),
}


SWITCHES = ("squeeze_excite", "attention_gates", "clinical_fusion", "cross_task")


def variant_spec(cfg: ModelConfig) -> VariantSpec:
    """The variant's parts, with the config's component switches (``model.attention_gates`` ...) applied.

    Raises:
        ValueError: a switch that the variant cannot have (cross-task paths without both segmentation
            and outcomes, attention gates without a decoder).
    """
    base = VARIANTS[cfg.variant]
    spec = replace(base, **{k: getattr(cfg, k) for k in SWITCHES if getattr(cfg, k) is not None})
    if spec.cross_task and not (spec.segmentation and spec.outcomes):
        raise ValueError(f"model.cross_task=true needs segmentation and outcomes; variant {cfg.variant} has "
                         f"{'segmentation' if spec.segmentation else 'outcomes'} only")
    if spec.attention_gates and not spec.segmentation:
        raise ValueError(f"model.attention_gates=true needs a decoder; variant {cfg.variant} has none")
    return spec


class JointModel(nn.Module):
    def __init__(self, cfg: ModelConfig, in_channels: int = 1, schema: ClinicalSchema | None = None):
        super().__init__()
        spec = variant_spec(cfg)
        if spec.dual_view and in_channels < 2:
            raise ValueError(f"variant 'dv' needs two views/modalities (preprocess.channels >= 2), got {in_channels}")
        self.spec, self.cfg = spec, cfg
        schema = schema or ClinicalSchema()
        channels = tuple(cfg.channels)
        self.uses_image = spec.segmentation or cfg.use_image
        act = ACTIVATIONS[cfg.activation]
        self.encoder = None
        if self.uses_image:
            encoder = DualViewEncoder if spec.dual_view else ImageEncoder
            self.encoder = encoder(in_channels, channels, spec.squeeze_excite, cfg.dropout, act)
        self.decoder = SegmentationDecoder(channels, in_channels, cfg.num_classes, spec.attention_gates,
                                           cfg.full_res_channels, cfg.full_res_unit, act) if spec.segmentation else None
        self.film = self.cross_attention = None
        if self.uses_image and spec.clinical_fusion:
            self.film = FiLM(channels[-1], cfg.clinical_dim)
            self.cross_attention = ClinicalCrossAttention(channels[-1], cfg.clinical_dim)
        self.clinical = None
        if spec.outcomes or (self.film is not None):
            self.clinical = ClinicalEncoder(schema.num_numeric, schema.cardinalities, cfg.clinical_dim, cfg.head_dropout)
        self.heads = None
        if spec.outcomes:
            pooled = channels[-1] if self.uses_image else 0
            self.to_hidden = nn.Sequential(nn.Linear(pooled + cfg.clinical_dim, OUTCOME_DIM), nn.GELU())
            self.heads = OutcomeHeads(OUTCOME_DIM, cfg.heads, cfg.cdr_classes, cfg.head_dropout)
        if spec.cross_task:
            self.gates = nn.ModuleList(nn.Linear(OUTCOME_DIM, c) for c in self.decoder.gated_channels)
            for gate in self.gates:  # zero init: gates start at exactly 1
                nn.init.zeros_(gate.weight)
                nn.init.zeros_(gate.bias)
            self.structure_volumes = StructureVolumes()
            # Standardised, the volumes (a few per cent of their mean from one subject to the next) reach
            # the heads at the scale of everything else in h, not a hundredth of it.
            self.standardize_volumes = RunningStandardize(cfg.num_classes - 1)
            self.from_structures = nn.Linear(cfg.num_classes - 1, OUTCOME_DIM)

    def forward(self, image: torch.Tensor | None, clinical: ClinicalInput | None = None, cross: float = 1.0,
                voxel_volume: torch.Tensor | None = None) -> JointOutput:
        """image (B, C, X, Y, Z) (None for a clinical-only ``outcome_only``); ``voxel_volume`` (B,) in mm³."""
        out = self.encode(image, clinical, cross, voxel_volume)
        if self.heads is not None:
            out.outcomes = self.heads(out.hidden)
        return out

    def encode(self, image: torch.Tensor | None, clinical: ClinicalInput | None = None, cross: float = 1.0,
               voxel_volume: torch.Tensor | None = None, features: list[torch.Tensor] | None = None) -> JointOutput:
        """Everything up to the outcome heads: segmentation logits and the hidden outcome representation.

        ``features``: the image encoder's output for ``image``, when the caller already has it (Monte Carlo
        ``decoder`` mode runs the encoder once and samples dropout on its features).
        """
        ref = image if image is not None else clinical.numeric
        batch, device = ref.shape[0], ref.device
        vector = tokens = None
        if self.clinical is not None:
            vector, tokens = self.clinical(clinical if clinical is not None else self.clinical.all_missing(batch, device))
        if self.encoder is not None and features is None:
            features = self.encoder(image)
        if features is not None and self.film is not None:
            bottleneck = self.cross_attention(self.film(features[-1], vector), tokens)
            features = [*features[:-1], bottleneck]
        if self.heads is None:
            logits = self.decoder(features, image)
            return JointOutput(seg=logits)
        parts = [features[-1].mean(dim=(2, 3, 4))] if features is not None else []
        hidden = self.to_hidden(torch.cat([*parts, vector], dim=1))
        logits = None
        if self.decoder is not None:
            gates = None
            if self.spec.cross_task:
                gates = [1.0 + cross * torch.tanh(g(hidden)) for g in self.gates]
            logits = self.decoder(features, image, gates)
            if self.spec.cross_task:
                if voxel_volume is None:
                    voxel_volume = torch.ones(batch, device=device)
                volumes = self.standardize_volumes(self.structure_volumes(logits[0], voxel_volume))
                # Not scaled by λ: detached, the volumes cannot disturb the segmentation, and holding them
                # back while it stabilises would leave the heads the last part of the budget to learn them.
                hidden = hidden + self.from_structures(volumes.to(hidden.dtype))
        return JointOutput(seg=logits, hidden=hidden)


def build_model(cfg: ModelConfig, in_channels: int = 1, schema: ClinicalSchema | None = None) -> JointModel:
    return JointModel(cfg, in_channels, schema)
