"""Size and cost of a configured model: parameters, FLOPs per case and output shapes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from jointray.config import Config
from jointray.data.clinical import ClinicalSchema
from jointray.models.joint import JointModel, build_model


@dataclass
class ModelSummary:
    variant: str
    parameters: int
    trainable: int
    flops_per_case: int  # forward pass, multiply-add counted as 2 FLOPs (torch's convention)
    input_shape: tuple[int, ...]
    output_shapes: dict[str, tuple[int, ...]]


def summarise(cfg: Config, schema: ClinicalSchema | None = None, model: JointModel | None = None) -> ModelSummary:
    schema = schema or ClinicalSchema()
    model = model or build_model(cfg.model, cfg.preprocess.channels, schema)
    model.eval()
    image = torch.zeros(1, cfg.preprocess.channels, *cfg.preprocess.target_shape) if model.uses_image else None
    clinical = model.clinical.all_missing(1, "cpu") if model.clinical is not None else None
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = model(image, clinical)
    shapes = {f"seg[{i}]": tuple(t.shape) for i, t in enumerate(out.seg or [])}
    shapes |= {name: tuple(t.shape) for name, t in out.outcomes.items()}
    return ModelSummary(
        variant=cfg.model.variant,
        parameters=sum(p.numel() for p in model.parameters()),
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        flops_per_case=int(counter.get_total_flops()),
        input_shape=tuple(image.shape) if image is not None else (),
        output_shapes=shapes,
    )
