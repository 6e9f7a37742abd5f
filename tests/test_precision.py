"""Mixed precision: the outcome heads and every task loss stay in fp32 under bf16 autocast."""

import torch

from jointray.config import LossConfig, ModelConfig
from jointray.data.clinical import ClinicalInput, ClinicalSchema, NumericFeature
from jointray.losses.joint import JointLoss
from jointray.models import build_model
from jointray.tasks import JointOutput, Targets

BATCH, SHAPE = 16, (32, 32, 32)
SCHEMA = ClinicalSchema(numeric=[NumericFeature(name="age", mean=72, std=7)], categorical=[])


def _batch():
    g = torch.Generator().manual_seed(0)
    image = torch.randn(BATCH, 1, *SHAPE, generator=g)
    clinical = ClinicalInput(numeric=torch.randn(BATCH, 1, generator=g), missing=torch.zeros(BATCH, 1, dtype=torch.bool),
                             categorical=torch.zeros(BATCH, 0, dtype=torch.long))
    label = torch.zeros(BATCH, *SHAPE, dtype=torch.long)
    label[:, 10:16, 10:20, 12:18] = 1
    label[:, 16:20, 10:20, 12:18] = 2
    targets = Targets(label=label, has_label=torch.ones(BATCH, dtype=torch.bool),
                      mmse=torch.linspace(18, 30, BATCH), cdr=torch.tensor([0.0, 0.5, 1.0, 2.0] * (BATCH // 4)),
                      time=torch.linspace(0.5, 6.0, BATCH), event=torch.tensor([1.0, 0.0] * (BATCH // 2)))
    return image, clinical, targets


def test_outcome_losses_under_bf16_autocast_equal_the_fp32_losses_of_the_same_outputs():
    torch.manual_seed(0)
    cfg = ModelConfig(channels=(8, 16, 32))
    model = build_model(cfg, 1, SCHEMA).eval()
    loss_fn = JointLoss(cfg, LossConfig(correlation_weight=0.5))
    image, clinical, targets = _batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(image, clinical, 0.5, torch.ones(BATCH))
        mixed = loss_fn(out, targets)
    as_fp32 = JointOutput(seg=[s.float() for s in out.seg], outcomes={k: v.float() for k, v in out.outcomes.items()})
    with torch.no_grad():
        reference = loss_fn(as_fp32, targets)
    assert set(mixed) == {"seg", "mmse", "cdr", "risk", "correlation"}
    for name, value in mixed.items():
        assert value.dtype == torch.float32, name
        assert abs(float(value) - float(reference[name])) <= 1e-6, (name, float(value), float(reference[name]))


def test_outcome_heads_are_not_quantised_by_bf16_autocast():
    torch.manual_seed(0)
    model = build_model(ModelConfig(channels=(8, 16, 32)), 1, SCHEMA).eval()
    image, clinical, _ = _batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(image, clinical, 0.5, torch.ones(BATCH))
    for name, value in out.outcomes.items():
        assert value.dtype == torch.float32, name
    mmse = out.outcomes["mmse"]
    # bf16 holds numbers in [16, 32) to 1/8 point: fp32 predictions fall between those steps.
    assert float((mmse * 8 - (mmse * 8).round()).abs().max()) > 1e-3
    assert len(set(mmse.tolist())) == BATCH
