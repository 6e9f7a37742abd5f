"""Refitting the outcome heads on cached features: what it fits, what it keeps and what it never touches."""

import math

import torch

from jointray.config import ModelConfig, RefitConfig, load_config
from jointray.losses.joint import JointLoss
from jointray.models.heads import OutcomeHeads
from jointray.tasks import JointOutput, Targets
from jointray.train.refit import HeadData, fit_heads

DIM = 16


def _cohort(n: int, seed: int, cdr_missing: bool = False) -> tuple[HeadData, torch.Tensor]:
    """Outcomes driven linearly by the first feature of h, as hippocampal volume drives MMSE."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, DIM, generator=g)
    z = hidden[:, 0]
    mmse = (25 + 2.5 * z + 0.5 * torch.randn(n, generator=g)).clamp(0, 30)
    cdr = torch.bucketize(-z, torch.tensor([-0.1, 1.0, 1.9])).float() * 0.5
    cdr = torch.where(cdr > 1.0, torch.full_like(cdr, 2.0), cdr)
    if cdr_missing:
        cdr = torch.full_like(cdr, math.nan)
    time = torch.exp(1.5 + 0.8 * z + 0.3 * torch.randn(n, generator=g))
    event = (torch.rand(n, generator=g) < 0.7).float()
    return HeadData(hidden, Targets(has_label=torch.zeros(n, dtype=torch.bool), mmse=mmse, cdr=cdr, time=time,
                                    event=event)), z


def _val_losses(heads, loss_fn, data):
    heads.eval()
    with torch.no_grad():
        losses = loss_fn(JointOutput(seg=None, outcomes=heads(data.hidden)), data.targets)
    return {k: float(v) for k, v in losses.items()}


def test_refit_fits_every_head_and_keeps_each_heads_best_state_on_validation():
    cfg = ModelConfig()
    loss_fn = JointLoss(cfg, load_config(None).train.loss)
    torch.manual_seed(0)
    heads = OutcomeHeads(DIM, ["mmse", "cdr", "risk"], cfg.cdr_classes, dropout=0.2)
    train, _ = _cohort(160, seed=1)
    val, z_val = _cohort(60, seed=2)
    before = _val_losses(heads, loss_fn, val)
    refit = RefitConfig(epochs=60, batch_size=32, lr=1e-2)
    kept = fit_heads(heads, loss_fn, train, val, ["mmse", "cdr", "risk"], refit, weight_decay=1e-4, seed=0)
    after = _val_losses(heads, loss_fn, val)
    assert all(1 <= kept[name] <= 60 for name in kept), kept  # every head improved on its incoming state
    # The MMSE head recovers the slope (2.5 points per SD): the untrained head is flat at 26.
    with torch.no_grad():
        mmse = heads(val.hidden)["mmse"]
    slope = float(torch.linalg.lstsq(torch.stack([torch.ones_like(z_val), z_val], 1), mmse.unsqueeze(1)).solution[1])
    assert 2.0 < slope < 3.0, slope
    assert float((mmse - val.targets.mmse).abs().mean()) < 0.8
    assert after["mmse"] < 0.2 * before["mmse"] and after["cdr"] < 0.7 * before["cdr"]
    assert after["risk"] < before["risk"]


def test_refit_is_deterministic_by_seed_and_leaves_the_callers_random_state_alone():
    cfg = ModelConfig()
    loss_fn = JointLoss(cfg, load_config(None).train.loss)
    train, _ = _cohort(64, seed=1)
    val, _ = _cohort(32, seed=2)
    states = []
    for _ in range(2):
        torch.manual_seed(0)
        heads = OutcomeHeads(DIM, ["mmse", "risk"], cfg.cdr_classes, dropout=0.2)
        marker = torch.random.get_rng_state()
        refit = RefitConfig(epochs=5, batch_size=16, lr=2e-3)
        fit_heads(heads, loss_fn, train, val, ["mmse", "risk"], refit, weight_decay=0.0, seed=7)
        assert torch.equal(torch.random.get_rng_state(), marker)
        states.append(heads.state_dict())
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], rtol=0, atol=0)


def test_a_head_without_validation_targets_is_kept_exactly_as_trained():
    cfg = ModelConfig()
    loss_fn = JointLoss(cfg, load_config(None).train.loss)
    torch.manual_seed(0)
    heads = OutcomeHeads(DIM, ["mmse", "cdr"], cfg.cdr_classes, dropout=0.2)
    original = {k: v.clone() for k, v in heads.state_dict().items()}
    train, _ = _cohort(64, seed=1)
    val, _ = _cohort(32, seed=2, cdr_missing=True)
    refit = RefitConfig(epochs=10, batch_size=16, lr=2e-3)
    kept = fit_heads(heads, loss_fn, train, val, ["mmse", "cdr"], refit, weight_decay=0.0, seed=0)
    assert kept["cdr"] == 0 and kept["mmse"] > 0
    state = heads.state_dict()
    cdr_keys = [k for k in state if k.startswith(("trunk.cdr.", "out.cdr.")) or k == "cdr_bias"]
    assert len(cdr_keys) == 4  # trunk linear weight and bias, output weight, ordered biases
    for key in cdr_keys:
        torch.testing.assert_close(state[key], original[key], rtol=0, atol=0)
    assert not torch.equal(state["out.mmse.weight"], original["out.mmse.weight"])
