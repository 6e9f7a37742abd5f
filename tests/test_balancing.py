"""Loss balancers and the curriculum: each defining rule recomputed by hand, and exact checkpoint resume."""

import copy
import io
import math

import numpy as np
import pytest
import torch
from torch import nn

from jointray.config import BalancerConfig, ConfigError, CurriculumConfig, load_config
from jointray.train.balancing import (
    DWABalancer,
    FixedBalancer,
    GradNormBalancer,
    InverseRateBalancer,
    UncertaintyBalancer,
    make_balancer,
)
from jointray.train.curriculum import Curriculum

TASKS = ["seg", "mmse", "cdr"]


def _losses(*values):
    return {task: torch.tensor(v) for task, v in zip(TASKS, values)}


def _softmax_weights(ratios, temperature):
    e = np.exp(np.asarray(ratios) / temperature)
    return len(ratios) * e / e.sum()


def _history(epochs=10):
    """Epoch-mean losses (epochs, 3): seg falls fast, mmse slowly, cdr stalls."""
    k = np.arange(epochs, dtype=np.float64)
    return np.stack([2.0 * np.exp(-0.3 * k), 1.5 / (1 + 0.05 * k), np.full(epochs, 0.8)], axis=1)


class _Toy(nn.Module):
    """A shared linear layer (the GradNorm ``W``) under one linear head per task; head 0 is 10x larger."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(4, 8)
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in TASKS)
        with torch.no_grad():
            self.heads[0].weight.mul_(10.0)

    def losses(self, x, y, tasks=TASKS):
        features = torch.tanh(self.shared(x))
        return {t: ((self.heads[TASKS.index(t)](features)[:, 0] - y[:, TASKS.index(t)]) ** 2).mean() for t in tasks}


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 4, generator=g), torch.randn(16, 3, generator=g)


# --- the rules ------------------------------------------------------------------------------------------


def test_fixed_total_is_weighted_sum():
    balancer = FixedBalancer(TASKS, {"seg": 2.0, "mmse": 0.5})
    assert balancer.weights() == {"seg": 2.0, "mmse": 0.5, "cdr": 1.0}
    assert balancer(_losses(1.5, 3.0, 0.7)).item() == pytest.approx(2.0 * 1.5 + 0.5 * 3.0 + 0.7)
    with pytest.raises(ValueError, match="unknown task"):
        FixedBalancer(TASKS, {"risk": 1.0})


def test_inverse_rate_uniform_in_warmup_then_softmax_of_relative_inverse_rate():
    history = _history(10)
    balancer = InverseRateBalancer(TASKS, temperature=0.5, warmup_epochs=5, window=3)
    for epoch, row in enumerate(history, start=1):
        balancer.epoch_end(dict(zip(TASKS, row)))
        weights = np.array(list(balancer.weights().values()))
        if epoch < 5:
            np.testing.assert_array_equal(weights, 1.0)
            continue
        seen = history[:epoch]
        loss_ratio = seen[-3:].mean(axis=0) / seen[:5].mean(axis=0)
        expected = _softmax_weights(loss_ratio / loss_ratio.mean(), 0.5)
        np.testing.assert_allclose(weights, expected, rtol=1e-6)
        assert weights.sum() == pytest.approx(3.0)
        assert np.argmax(weights) == TASKS.index("cdr")  # the stalled task
        assert np.argmin(weights) == TASKS.index("seg")  # the fastest learner


def test_dwa_uniform_for_two_epochs_then_softmax_of_last_ratio():
    history = _history(6)
    balancer = DWABalancer(TASKS)  # temperature 2, the paper's
    for epoch, row in enumerate(history, start=1):
        balancer.epoch_end(dict(zip(TASKS, row)))
        weights = np.array(list(balancer.weights().values()))
        if epoch < 2:
            np.testing.assert_array_equal(weights, 1.0)
            continue
        expected = _softmax_weights(history[epoch - 1] / history[epoch - 2], 2.0)
        np.testing.assert_allclose(weights, expected, rtol=1e-6)
        assert np.argmax(weights) == TASKS.index("cdr")


def test_uncertainty_step_moves_log_variance_towards_the_loss():
    balancer = UncertaintyBalancer(TASKS)
    assert [p is balancer.log_variance for p in balancer.parameters()] == [True]
    losses = _losses(10.0, 0.01, 1.0)
    expected = sum(0.5 * v.item() for v in losses.values())  # s = 0: 0.5·L + 0
    total = balancer(losses)
    assert total.item() == pytest.approx(expected)
    optimizer = torch.optim.SGD(balancer.parameters(), lr=0.1)
    total.backward()
    optimizer.step()
    s = balancer.log_variance.detach()
    assert s[0] > 0 and s[1] < 0 and s[2] == 0  # loss 1 is already stationary: s* = log 1
    weights = balancer.weights()
    assert weights["seg"] < 0.5 < weights["mmse"]
    assert weights["seg"] == pytest.approx(0.5 * math.exp(-s[0].item()))


def test_uncertainty_stationary_point_is_log_loss_whatever_the_scale():
    balancer = UncertaintyBalancer(TASKS)
    losses = _losses(4.0, 0.25, 1.7)
    optimizer = torch.optim.SGD(balancer.parameters(), lr=0.5)
    for _ in range(1500):
        optimizer.zero_grad()
        balancer(losses, scales={"seg": 1.0, "mmse": 0.3, "cdr": 0.6}).backward()
        optimizer.step()
    np.testing.assert_allclose(balancer.log_variance.detach().numpy(), np.log([4.0, 0.25, 1.7]), atol=1e-4)


def test_gradnorm_first_step_by_hand_then_the_steeper_task_loses_weight():
    torch.manual_seed(0)
    model = _Toy()
    balancer = GradNormBalancer(TASKS[:2], model.shared.parameters(), alpha=1.5, lr=0.025)
    x, y = _batch(0)
    losses = model.losses(x, y, TASKS[:2])
    norms = []
    for loss in losses.values():
        grads = torch.autograd.grad(loss, list(model.shared.parameters()), retain_graph=True)
        norms.append(math.sqrt(sum((g**2).sum().item() for g in grads)))
    assert norms[0] > 3 * norms[1]
    balancer(losses)
    # Step 1: w = 1, r = 1, target = mean(G); Adam's first step is lr · sign(gradient), where the
    # gradient of |G_t − target| is sign(G_t − target) · ‖∇L_t‖: the steeper task goes down by lr.
    np.testing.assert_allclose(list(balancer.weights().values()), [0.975, 1.025], rtol=1e-6)
    for _ in range(40):  # the model is held fixed: equal training rates, so gradient norms are equalised
        balancer(model.losses(x, y, TASKS[:2]))
        weights = balancer.task_weights.detach()
        assert weights.sum().item() == pytest.approx(2.0, abs=1e-6)
        assert balancer.task_weights.grad is None
    assert weights[0] < 0.5 < 1.5 < weights[1]


def test_gradnorm_total_backpropagates_the_step_weights_detached():
    torch.manual_seed(0)
    model = _Toy()
    balancer = GradNormBalancer(TASKS, model.shared.parameters())
    x, y = _batch(1)
    balancer(model.losses(x, y))  # weights now differ from 1
    step_weights = balancer.weights()
    model.zero_grad()
    total = balancer(model.losses(x, y))
    total.backward()
    got = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    losses = model.losses(x, y)
    sum(step_weights[t] * losses[t] for t in TASKS).backward()
    for g, expected in zip(got, (p.grad for p in model.parameters())):
        torch.testing.assert_close(g, expected)
    assert balancer.weights() != step_weights  # the update happened, after the weights were applied


def test_gradnorm_does_not_update_outside_training():
    torch.manual_seed(0)
    model = _Toy()
    balancer = GradNormBalancer(TASKS, model.shared.parameters())
    x, y = _batch(2)
    balancer.eval()
    balancer(model.losses(x, y))
    balancer.train()
    with torch.no_grad():
        balancer(model.losses(x, y))
    assert balancer.weights() == dict.fromkeys(TASKS, 1.0)
    assert balancer.initial_losses.isnan().all()


# --- absent tasks, scales, bad input ---------------------------------------------------------------------


def test_missing_task_is_skipped():
    fixed = FixedBalancer(TASKS, {"seg": 2.0, "mmse": 3.0})
    assert fixed({"seg": torch.tensor(1.0), "cdr": torch.tensor(0.5)}).item() == pytest.approx(2.5)

    uncertainty = UncertaintyBalancer(TASKS)
    uncertainty({"seg": torch.tensor(2.0)}).backward()
    assert uncertainty.log_variance.grad[1:].eq(0).all() and uncertainty.log_variance.grad[0] != 0

    torch.manual_seed(0)
    model = _Toy()
    gradnorm = GradNormBalancer(TASKS, model.shared.parameters())
    x, y = _batch(3)
    for _ in range(5):
        gradnorm(model.losses(x, y, ["seg", "mmse"]))
    weights = gradnorm.task_weights.detach()
    assert weights[2] == 1.0 and weights.sum().item() == pytest.approx(3.0, abs=1e-6)
    assert gradnorm.initial_losses[2].isnan()

    dwa = DWABalancer(TASKS)
    for row in _history(3):
        dwa.epoch_end({"seg": row[0], "mmse": row[1]})  # no cdr target all epoch: ratio counted as 1
    expected = _softmax_weights([*(_history(3)[2, :2] / _history(3)[1, :2]), 1.0], 2.0)
    np.testing.assert_allclose(list(dwa.weights().values()), expected, rtol=1e-6)


def test_scales_multiply_each_balanced_term():
    balancer = FixedBalancer(TASKS, {"seg": 2.0})
    phase = Curriculum(CurriculumConfig(enabled=True), lr=1e-3).at(0.0)  # seg 0.8, outcome 0.2
    losses = _losses(1.0, 2.0, 3.0)
    total = balancer(losses, scales=phase.scales(losses))
    assert total.item() == pytest.approx(0.8 * 2.0 * 1.0 + 0.2 * 2.0 + 0.2 * 3.0)


def test_bad_input_is_named():
    balancer = FixedBalancer(TASKS)
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['risk'\]"):
        balancer({"risk": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="no task loss given"):
        balancer({})
    with pytest.raises(ValueError, match="must be 0-d"):
        balancer({"seg": torch.ones(2)})
    with pytest.raises(ValueError, match=r"none for task\(s\) \['mmse'\]"):
        balancer(_losses(1.0, 1.0), scales={"seg": 1.0})
    with pytest.raises(ValueError, match="unknown task"):
        balancer.epoch_end({"sge": 1.0})


# --- checkpoint / resume ---------------------------------------------------------------------------------


BUILDERS = {
    "fixed": lambda shared: FixedBalancer(TASKS, {"seg": 0.5, "cdr": 2.0}),
    "inverse_rate": lambda shared: InverseRateBalancer(TASKS, warmup_epochs=2, window=2),
    "dwa": lambda shared: DWABalancer(TASKS),
    "uncertainty": lambda shared: UncertaintyBalancer(TASKS),
    "gradnorm": lambda shared: GradNormBalancer(TASKS, shared),
}


def _train(model, balancer, optimizer, epochs):
    """A miniature trainer: some steps lack a task, epoch means go to ``epoch_end``."""
    for epoch in epochs:
        sums = dict.fromkeys(TASKS, 0.0)
        counts = dict.fromkeys(TASKS, 0)
        for step in range(3):
            tasks = TASKS if step != 1 else ["seg", "cdr"]
            losses = model.losses(*_batch(100 * epoch + step), tasks)
            optimizer.zero_grad()
            balancer(losses).backward()
            optimizer.step()
            for task, loss in losses.items():
                sums[task] += loss.item()
                counts[task] += 1
        balancer.epoch_end({t: sums[t] / counts[t] for t in TASKS})


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_state_dict_round_trip_resumes_exactly(kind):
    torch.manual_seed(0)
    model = _Toy()
    balancer = BUILDERS[kind](model.shared.parameters())
    optimizer = torch.optim.SGD([*model.parameters(), *balancer.parameters()], lr=0.01)
    _train(model, balancer, optimizer, range(4))
    assert kind == "fixed" or balancer.weights() != dict.fromkeys(TASKS, 1.0)

    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "balancer": balancer.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)  # as the trainer and server load checkpoints
    resumed_model = copy.deepcopy(model)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = BUILDERS[kind](resumed_model.shared.parameters())
    resumed.load_state_dict(checkpoint["balancer"])
    assert resumed.weights() == balancer.weights()
    resumed_optimizer = torch.optim.SGD([*resumed_model.parameters(), *resumed.parameters()], lr=0.01)

    _train(model, balancer, optimizer, range(4, 7))
    _train(resumed_model, resumed, resumed_optimizer, range(4, 7))
    assert resumed.weights() == balancer.weights()
    for name, tensor in balancer.state_dict().items():
        if name != "_extra_state":
            torch.testing.assert_close(resumed.state_dict()[name], tensor, rtol=0, atol=0, equal_nan=True)


def test_state_of_other_tasks_is_refused():
    with pytest.raises(ValueError, match="state is for tasks"):
        DWABalancer(["seg", "mmse"]).load_state_dict(DWABalancer(TASKS).state_dict())


# --- configuration ---------------------------------------------------------------------------------------


def test_make_balancer_builds_each_kind_with_its_defaults():
    model = _Toy()
    built = {
        kind: make_balancer(BalancerConfig(kind=kind), TASKS, model.shared.parameters())
        for kind in ["fixed", "inverse_rate", "uncertainty", "dwa", "gradnorm"]
    }
    assert {kind: type(b) for kind, b in built.items()} == {
        "fixed": FixedBalancer,
        "inverse_rate": InverseRateBalancer,
        "uncertainty": UncertaintyBalancer,
        "dwa": DWABalancer,
        "gradnorm": GradNormBalancer,
    }
    assert built["inverse_rate"].temperature == 1.0 and built["dwa"].temperature == 2.0
    assert make_balancer(BalancerConfig(kind="dwa", temperature=0.7), TASKS).temperature == 0.7
    fixed = make_balancer(BalancerConfig(kind="fixed", weights={"seg": 3.0, "risk": 9.0}), TASKS)
    assert fixed.weights() == {"seg": 3.0, "mmse": 1.0, "cdr": 1.0}  # risk is not trained here
    with pytest.raises(ValueError, match="needs shared_parameters"):
        make_balancer(BalancerConfig(kind="gradnorm"), TASKS)


def test_unknown_balancer_kind_names_the_allowed_kinds():
    with pytest.raises(ConfigError, match="train.balancer.kind: got 'pcgrad'.*'fixed', 'inverse_rate'"):
        load_config(None, ["train.balancer.kind=pcgrad"])
    with pytest.raises(ValueError, match=r"expected one of \['fixed', 'inverse_rate', 'uncertainty'"):
        make_balancer(BalancerConfig.model_construct(kind="pcgrad"), TASKS)


def test_balancer_config_ranges():
    cfg = load_config(None, ["train.balancer.kind=fixed", "train.balancer.weights={seg: 2, cdr: 0.5}"]).train
    assert cfg.balancer.weights == {"seg": 2.0, "cdr": 0.5}
    for override, key in [
        ("train.balancer.weights={seg: -1}", "train.balancer.weights"),
        ("train.balancer.weights={sge: 1}", "train.balancer.weights.sge"),
        ("train.balancer.temperature=0", "train.balancer.temperature"),
        ("train.balancer.warmup_epochs=0", "train.balancer.warmup_epochs"),
        ("train.balancer.alpha=-1", "train.balancer.alpha"),
    ]:
        with pytest.raises(ConfigError, match=key):
            load_config(None, [override])


@pytest.mark.parametrize(
    ("progress", "index"), [(0.0, 0), (0.29, 0), (0.3, 1), (0.59, 1), (0.6, 2), (0.99, 2), (1.0, 2)]
)
def test_curriculum_phase_boundaries(progress, index):
    """Phase rates are multiples of train.lr (1, 0.5, 0.2 by default), so train.lr=2e-3 doubles each."""
    curriculum = Curriculum(load_config(None, ["train.curriculum.enabled=true"]).train.curriculum, lr=2e-3)
    phase = curriculum.at(progress)
    assert phase.index == index
    assert (phase.seg, phase.outcome, phase.cross) == [(0.8, 0.2, 0.0), (0.6, 0.4, 0.3), (0.5, 0.5, 0.5)][index]
    assert phase.lr == pytest.approx([2e-3, 1e-3, 4e-4][index], rel=1e-15)
    assert phase.task_scale("seg") == phase.seg
    assert phase.task_scale("risk") == phase.task_scale("mmse") == phase.outcome


def test_curriculum_progress_from_epochs_and_bad_input():
    curriculum = Curriculum(CurriculumConfig(enabled=True), lr=1e-3)
    assert [curriculum.at(epoch / 10).index for epoch in range(10)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    assert [(p.start, p.until) for p in curriculum.phases] == [(0.0, 0.3), (0.3, 0.6), (0.6, 1.0)]
    with pytest.raises(ValueError, match="progress must be in"):
        curriculum.at(1.2)
    with pytest.raises(ValueError, match="unknown task 'volume'"):
        curriculum.at(0.5).task_scale("volume")


def test_the_default_no_curriculum_is_one_full_phase_at_train_lr():
    cfg = load_config(None, ["train.lr=3e-4"]).train
    curriculum = Curriculum(cfg.curriculum, lr=cfg.lr)
    assert len(curriculum.phases) == 1
    phase = curriculum.at(0.5)
    assert (phase.start, phase.until, phase.seg, phase.outcome, phase.cross, phase.lr) == (0.0, 1.0, 1, 1, 1, 3e-4)


def _phases(*specs):
    rows = ", ".join(f"{{until: {u}, seg: {s}, outcome: {o}, cross: {c}, lr_scale: 1.0}}" for u, s, o, c in specs)
    return f"train.curriculum.phases=[{rows}]"


@pytest.mark.parametrize(
    ("phases", "message"),
    [
        ([(0.5, 1, 0, 0), (0.5, 1, 1, 0), (1.0, 1, 1, 0)], "train.curriculum.phases: .*strictly increasing"),
        ([(0.6, 1, 0, 0), (0.4, 1, 1, 0), (1.0, 1, 1, 0)], "train.curriculum.phases: .*strictly increasing"),
        ([(0.5, 1, 0, 0), (0.9, 1, 1, 0)], r"train.curriculum.phases: .*until=1.0, not 0.9"),
        ([(1.0, -0.1, 1, 0)], "train.curriculum.phases.0.seg"),
        ([(1.0, 1, 1, 1.5)], "train.curriculum.phases.0.cross"),
        ([(0.5, 0, 0, 0), (1.0, 1, 1, 0)], "train.curriculum.phases.0: .*seg or outcome > 0"),
    ],
)
def test_invalid_phases_name_the_key(phases, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [_phases(*phases)])


def test_valid_custom_phases_load():
    cfg = load_config(None, ["train.curriculum.enabled=true", _phases((0.5, 1, 0, 0), (1.0, 0.5, 0.5, 1))]).train.curriculum
    assert [p.until for p in cfg.phases] == [0.5, 1.0]
    assert Curriculum(cfg, lr=1e-3).at(0.5).cross == 1.0
