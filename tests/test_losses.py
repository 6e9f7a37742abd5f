"""jointray.losses against reference implementations (lifelines, statsmodels, MONAI) and hand formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss

from jointray.losses import (
    CoralLoss,
    CoxPHLoss,
    DeepSupervisionDiceCE,
    MaskedHuberLoss,
    TaskCorrelationPenalty,
    cdr_to_class,
    class_to_cdr,
    coral_predict,
    coral_probabilities,
    pool_label,
)


def _lbfgs(params: list[torch.Tensor], objective) -> None:
    """Minimise a smooth float64 objective to (numerical) convergence."""
    optimizer = torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=500,
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure():
        optimizer.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    for _ in range(3):  # restarts: LBFGS may stop on tolerance_change before the gradient is tiny
        optimizer.step(closure)


# ---------------------------------------------------------------------------------------- survival


@pytest.fixture(scope="module")
def rossi():
    from lifelines.datasets import load_rossi

    df = load_rossi()
    covariates = [c for c in df.columns if c not in ("week", "arrest")]
    x = torch.tensor(df[covariates].to_numpy(), dtype=torch.float64)
    time = torch.tensor(df["week"].to_numpy(), dtype=torch.float64)
    event = torch.tensor(df["arrest"].to_numpy(), dtype=torch.float64)
    return df, covariates, x, time, event


def _fit_cox(x: torch.Tensor, time: torch.Tensor, event: torch.Tensor, ties: str) -> tuple[np.ndarray, float]:
    """Linear Cox model on the original covariate scale; returns (coefficients, loss at the optimum)."""
    beta = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    loss_fn = CoxPHLoss(ties=ties)
    _lbfgs([beta], lambda: loss_fn(x @ beta, time, event))
    with torch.no_grad():
        final = loss_fn(x @ beta, time, event).item()
    return beta.detach().numpy(), final


def test_cox_efron_matches_lifelines_on_rossi(rossi):
    from lifelines import CoxPHFitter

    df, covariates, x, time, event = rossi
    assert len(set(df.loc[df.arrest == 1, "week"])) < int(df.arrest.sum())  # many tied event times

    reference = CoxPHFitter().fit(df, duration_col="week", event_col="arrest")
    expected = reference.params_[covariates].to_numpy()
    beta, loss = _fit_cox(x, time, event, "efron")

    assert np.abs(beta - expected).max() < 1e-4, (beta, expected)
    # The loss is the log partial likelihood divided by the number of events.
    assert -loss * event.sum().item() == pytest.approx(reference.log_likelihood_, abs=1e-6)

    breslow, _ = _fit_cox(x, time, event, "breslow")
    assert np.abs(beta - breslow).max() > 5e-4  # ties matter here: the approximations must differ


def test_cox_breslow_matches_statsmodels_on_rossi(rossi):
    from statsmodels.duration.hazard_regression import PHReg

    df, covariates, x, time, event = rossi
    reference = PHReg(df["week"].to_numpy(), df[covariates].to_numpy(), status=df["arrest"].to_numpy(), ties="breslow")
    result = reference.fit()
    beta, loss = _fit_cox(x, time, event, "breslow")

    assert np.abs(beta - result.params).max() < 1e-4, (beta, result.params)
    assert -loss * event.sum().item() == pytest.approx(result.llf, abs=1e-6)


def _partial_likelihood_loop(eta: list[float], time: list[float], event: list[int], ties: str) -> float:
    """The textbook formulas, one event time at a time, in plain Python floats."""
    log_lik = 0.0
    for t in sorted({t for t, e in zip(time, event, strict=True) if e == 1}):
        tied = [i for i in range(len(eta)) if time[i] == t and event[i] == 1]
        at_risk = [i for i in range(len(eta)) if time[i] >= t]
        d = len(tied)
        risk_sum = sum(math.exp(eta[i]) for i in at_risk)
        tied_sum = sum(math.exp(eta[i]) for i in tied)
        log_lik += sum(eta[i] for i in tied)
        if ties == "efron":
            log_lik -= sum(math.log(risk_sum - (rank / d) * tied_sum) for rank in range(d))
        else:
            log_lik -= d * math.log(risk_sum)
    return -log_lik / sum(event)


# Ties among events, between events and censorings, a censoring before every event, a tie of three.
TIED_ETA = [0.5, -1.2, 0.3, 2.0, 0.0, -0.7, 1.1, 0.4, -0.3, 0.9]
TIED_TIME = [3.0, 3.0, 5.0, 5.0, 5.0, 1.0, 7.0, 7.0, 9.0, 5.0]
TIED_EVENT = [1, 1, 1, 1, 0, 0, 1, 0, 1, 1]


@pytest.mark.parametrize("ties", ["efron", "breslow"])
def test_cox_value_equals_loop_and_ignores_masked_subjects(ties):
    loss_fn = CoxPHLoss(ties=ties)
    expected = _partial_likelihood_loop(TIED_ETA, TIED_TIME, TIED_EVENT, ties)
    eta = torch.tensor(TIED_ETA, dtype=torch.float64)
    time = torch.tensor(TIED_TIME, dtype=torch.float64)
    event = torch.tensor(TIED_EVENT, dtype=torch.float64)
    assert loss_fn(eta, time, event).item() == pytest.approx(expected, abs=1e-10)

    # Same value in any order, and with extra subjects whose time or event is missing.
    perm = torch.randperm(len(TIED_ETA), generator=torch.Generator().manual_seed(0))
    masked_eta = torch.cat([eta[perm], torch.tensor([5.0, -3.0, 0.1], dtype=torch.float64)])
    masked_time = torch.cat([time[perm], torch.tensor([math.nan, 2.0, 4.0], dtype=torch.float64)])
    masked_event = torch.cat([event[perm], torch.tensor([1.0, math.nan, math.nan], dtype=torch.float64)])
    assert loss_fn(masked_eta, masked_time, masked_event).item() == pytest.approx(expected, abs=1e-10)
    # (B, 1) scores are accepted as (B,).
    assert loss_fn(eta[:, None], time, event).item() == pytest.approx(expected, abs=1e-10)


def test_cox_efron_differs_from_breslow_only_with_ties():
    eta = torch.tensor(TIED_ETA, dtype=torch.float64)
    event = torch.tensor(TIED_EVENT, dtype=torch.float64)
    tied = torch.tensor(TIED_TIME, dtype=torch.float64)
    distinct = torch.arange(len(TIED_ETA), dtype=torch.float64)
    assert CoxPHLoss("efron")(eta, tied, event).item() < CoxPHLoss("breslow")(eta, tied, event).item() - 1e-3
    assert CoxPHLoss("efron")(eta, distinct, event).item() == pytest.approx(
        CoxPHLoss("breslow")(eta, distinct, event).item(), abs=1e-12
    )


@pytest.mark.parametrize("ties", ["efron", "breslow"])
def test_cox_is_stable_for_large_scores_and_has_exact_gradients(ties):
    loss_fn = CoxPHLoss(ties=ties)
    eta = torch.tensor(TIED_ETA, dtype=torch.float64)
    time = torch.tensor(TIED_TIME, dtype=torch.float64)
    event = torch.tensor(TIED_EVENT, dtype=torch.float64)
    reference = loss_fn(eta, time, event).item()
    # Shift invariance of the partial likelihood, far beyond where exp() overflows (float64: ~709).
    assert loss_fn(eta + 1000.0, time, event).item() == pytest.approx(reference, abs=1e-9)
    # Scores spread over 2000 units: finite, and finite gradients.
    spread = (eta * 1000.0).requires_grad_()
    value = loss_fn(spread, time, event)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(spread.grad).all()
    assert torch.autograd.gradcheck(lambda s: loss_fn(s, time, event), (eta.clone().requires_grad_(),))
    # float32 gives the same value to float32 precision.
    assert loss_fn(eta.float(), time.float(), event.float()).item() == pytest.approx(reference, rel=1e-6)


def test_cox_without_events_is_zero_with_graph():
    eta = torch.tensor([0.3, math.nan, -0.2], dtype=torch.float64, requires_grad=True)
    time = torch.tensor([1.0, 2.0, math.nan], dtype=torch.float64)
    event = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)  # the only event has no time
    loss = CoxPHLoss()(eta, time, event)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(eta.grad, torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="event must be 0 or 1"):
        CoxPHLoss()(eta.detach(), time, torch.tensor([0.0, 2.0, 1.0], dtype=torch.float64))


# ----------------------------------------------------------------------------------------- ordinal


def test_coral_loss_equals_hand_formula_and_skips_missing():
    logits = [[0.3, -0.2, -1.0], [2.0, 1.0, 0.5], [-0.4, -0.9, -2.5], [1.5, 0.2, -0.1], [9.0, 9.0, 9.0]]
    classes = [0, 2, 3, 1]  # the fifth subject has no target

    def hand(weights: list[float]) -> float:
        total = 0.0
        for z, y in zip(logits[:4], classes, strict=True):
            for k, (zk, wk) in enumerate(zip(z, weights, strict=True)):
                p = 1.0 / (1.0 + math.exp(-zk))
                total -= wk * (math.log(p) if y > k else math.log(1.0 - p))
        return total / len(classes)

    input = torch.tensor(logits, dtype=torch.float64)
    for missing in (torch.tensor(classes + [-1]), torch.tensor(classes + [math.nan], dtype=torch.float64)):
        assert CoralLoss()(input, missing).item() == pytest.approx(hand([1.0, 1.0, 1.0]), abs=1e-12)
    weights = [2.0, 1.0, 0.5]
    assert CoralLoss(importance_weights=weights)(input, torch.tensor(classes + [-1])).item() == pytest.approx(
        hand(weights), abs=1e-12
    )


def test_coral_loss_missing_and_invalid_targets():
    logits = torch.randn(3, 3, requires_grad=True)
    loss = CoralLoss()(logits, torch.tensor([-1, -1, -1]))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros(3, 3))
    with pytest.raises(ValueError, match="class targets"):
        CoralLoss()(logits, torch.tensor([0, 4, 1]))  # K = 4 classes: 4 is out of range


def test_coral_probabilities_are_a_distribution():
    logits = torch.randn(64, 3, generator=torch.Generator().manual_seed(0)) * 3  # not rank-consistent
    probs = coral_probabilities(logits)
    assert probs.shape == (64, 4)
    assert (probs >= 0).all()
    torch.testing.assert_close(probs.sum(1), torch.ones(64))
    # Rank-consistent logits: p_k = σ(z_{k-1}) − σ(z_k) exactly.
    consistent = torch.tensor([[2.0, 0.5, -1.0]])
    s = torch.sigmoid(consistent)[0]
    expected = torch.tensor([[1 - s[0], s[0] - s[1], s[1] - s[2], s[2]]])
    torch.testing.assert_close(coral_probabilities(consistent), expected)
    assert coral_predict(consistent).tolist() == [2]


def test_coral_trains_a_linear_model_on_separable_ordinal_data():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(400, 2, generator=generator)
    score = x @ torch.tensor([2.0, -1.0])
    keep = torch.stack([(score - c).abs() > 0.15 for c in (-1.0, 0.5, 2.0)]).all(0)  # a margin: separable
    x, score = x[keep], score[keep]
    y = torch.bucketize(score, torch.tensor([-1.0, 0.5, 2.0]))
    assert y.bincount().min() > 20

    torch.manual_seed(0)
    weight = torch.nn.Linear(2, 1, bias=False)  # CORAL head: shared weights, K-1 biases
    bias = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.Adam([*weight.parameters(), bias], lr=0.05)
    loss_fn = CoralLoss()
    for _ in range(300):
        optimizer.zero_grad()
        loss = loss_fn(weight(x) + bias, y)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        logits = weight(x) + bias
    assert (coral_predict(logits) == y).float().mean().item() > 0.9
    assert (coral_probabilities(logits).argmax(1) == y).float().mean().item() > 0.9


def test_cdr_class_mapping():
    cdr = torch.tensor([0.0, 0.5, 1.0, 2.0, 3.0, math.nan], dtype=torch.float64)
    assert cdr_to_class(cdr).tolist() == [0, 1, 2, 3, 3, -1]  # stage 3 merged with stage 2
    assert cdr_to_class(cdr, num_classes=5).tolist() == [0, 1, 2, 3, 4, -1]
    back = class_to_cdr(torch.tensor([0, 1, 2, 3, -1]))
    assert back[:4].tolist() == [0.0, 0.5, 1.0, 2.0] and math.isnan(back[4].item())
    with pytest.raises(ValueError, match="CDR values"):
        cdr_to_class(torch.tensor([0.75]))


# ------------------------------------------------------------------------------------ segmentation


def _pool_label_loop(label: np.ndarray, f: int) -> np.ndarray:
    """Reference downsampling by a factor f, block by block: the most frequent foreground class, else background."""
    b, x, y, z = label.shape
    out = np.zeros((b, x // f, y // f, z // f), dtype=np.int64)
    for n in range(b):
        for i in range(x // f):
            for j in range(y // f):
                for k in range(z // f):
                    block = label[n, i * f : (i + 1) * f, j * f : (j + 1) * f, k * f : (k + 1) * f]
                    counts = np.bincount(block.ravel(), minlength=3)[1:]
                    out[n, i, j, k] = 1 + int(np.argmax(counts)) if counts.sum() else 0
    return out


def _random_case(seed: int, batch: int = 2, size: int = 8):
    generator = torch.Generator().manual_seed(seed)
    logits = [torch.randn(batch, 3, size // f, size // f, size // f, generator=generator) for f in (1, 2, 4)]
    label = torch.zeros(batch, size, size, size, dtype=torch.long)
    label[:, 2:6, 2:5, 3:7] = 1  # a "head"
    label[:, 3:5, 5:8, 3:5] = 2  # a thin "tail"
    noise = torch.randint(0, 3, label.shape, generator=generator)
    label = torch.where(torch.rand(label.shape, generator=generator) < 0.1, noise, label)
    return logits, label


def test_pool_label_matches_block_loop_and_keeps_thin_structures():
    _, label = _random_case(0)
    for factor in (2, 4):
        size = (8 // factor,) * 3
        np.testing.assert_array_equal(pool_label(label, size, 3).numpy(), _pool_label_loop(label.numpy(), factor))

    thin = torch.zeros(1, 8, 8, 8, dtype=torch.long)
    thin[0, 1, 1, :] = 2  # one voxel across
    assert (pool_label(thin, (2, 2, 2), 3) == 2).any()
    assert not (F.interpolate(thin[:, None].float(), size=(2, 2, 2), mode="nearest-exact") == 2).any()


def test_deep_supervision_equals_weighted_monai_dice_ce():
    logits, label = _random_case(1)
    reference = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True)
    targets = [label, *(torch.from_numpy(_pool_label_loop(label.numpy(), f)) for f in (2, 4))]
    expected = sum(
        w * reference(out, tgt[:, None]) for w, out, tgt in zip((0.6, 0.3, 0.1), logits, targets, strict=True)
    )
    assert DeepSupervisionDiceCE()(logits, label).item() == pytest.approx(expected.item(), rel=1e-6)
    # Weights are normalised over the outputs given: two outputs → 2/3 and 1/3.
    full, half = (reference(out, tgt[:, None]) for out, tgt in zip(logits[:2], targets[:2], strict=True))
    expected_two = (0.6 * full + 0.3 * half) / 0.9
    assert DeepSupervisionDiceCE()(logits[:2], label).item() == pytest.approx(expected_two.item(), rel=1e-6)
    assert DeepSupervisionDiceCE()(logits[0], label).item() == pytest.approx(
        reference(logits[0], label[:, None]).item(), rel=1e-6
    )


def test_deep_supervision_perfect_prediction_is_near_zero():
    _, label = _random_case(2)
    logits = [20.0 * F.one_hot(pool_label(label, (s,) * 3, 3), 3).movedim(-1, 1).float() for s in (8, 4, 2)]
    assert DeepSupervisionDiceCE()(logits, label).item() < 1e-4
    assert DeepSupervisionDiceCE()([-lg for lg in logits], label).item() > 1.0


def test_deep_supervision_masked_subjects_contribute_nothing():
    logits, label = _random_case(3, batch=3)
    loss_fn = DeepSupervisionDiceCE()
    has_label = torch.tensor([True, False, True])
    expected = loss_fn([out[[0, 2]] for out in logits], label[[0, 2]]).item()

    garbage = label.clone()
    garbage[1] = -1  # an unlabelled subject's label is never read
    inputs = [out.clone().requires_grad_() for out in logits]
    loss = loss_fn(inputs, garbage, has_label)
    loss.backward()
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert all(out.grad[1].abs().max() == 0 and out.grad[0].abs().max() > 0 for out in inputs)

    none = [out.clone().requires_grad_() for out in logits]
    loss = loss_fn(none, garbage, torch.zeros(3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and all(out.grad.abs().max() == 0 for out in none)


# -------------------------------------------------------------------------------------- regression


def test_masked_huber_equals_torch_on_present_subjects():
    pred = torch.tensor([10.0, 25.0, 28.0, 30.0, 17.5], requires_grad=True)
    target = torch.tensor([12.5, math.nan, 27.5, 22.0, math.nan])
    present = ~torch.isnan(target)
    for delta in (1.0, 3.0):
        expected = F.huber_loss(pred[present], target[present], delta=delta)
        assert MaskedHuberLoss(delta)(pred, target).item() == pytest.approx(expected.item(), rel=1e-6)
    assert MaskedHuberLoss(2.0)(pred[:, None], target).item() == pytest.approx(
        F.huber_loss(pred[present], target[present], delta=2.0).item(), rel=1e-6
    )
    with pytest.raises(ValueError):
        MaskedHuberLoss()(pred, target[:3])

    loss = MaskedHuberLoss()(pred, torch.full((5,), math.nan))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(pred.grad, torch.zeros(5))


# ------------------------------------------------------------------------------------- correlation


def _as_torch(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {name: torch.tensor(a, dtype=torch.float64) for name, a in arrays.items()}


def test_task_correlation_penalty_equals_numpy():
    pred = {
        "mmse": np.array([28.0, 25.0, 20.0, 27.0, 15.0, 22.0, 29.0]),
        "cdr": np.array([0.2, 0.4, 1.5, 0.1, 2.2, 1.0, 0.3]),
        "risk": np.array([-1.0, 0.5, 0.2, -0.3, 1.8, 0.0, -0.6]),
    }
    target = {
        "mmse": np.array([29.0, 26.0, 18.0, math.nan, 14.0, 24.0, 30.0]),
        "cdr": np.array([0.0, 1.0, 2.0, 0.0, 3.0, math.nan, 0.0]),
        "risk": np.array([math.nan, 1.0, math.nan, math.nan, 1.0, math.nan, 0.0]),  # cdr-risk: only 3
        "unused": np.array([1.0] * 7),  # no prediction for it: ignored
    }

    def pair(a: str, b: str) -> float:
        both = ~np.isnan(target[a]) & ~np.isnan(target[b])
        r_pred = np.corrcoef(pred[a][both], pred[b][both])[0, 1]
        r_target = np.corrcoef(target[a][both], target[b][both])[0, 1]
        return (r_pred - r_target) ** 2

    # mmse-risk has 3 subjects with both targets, cdr-risk 3 as well; all three pairs count.
    expected = np.mean([pair("mmse", "cdr"), pair("mmse", "risk"), pair("cdr", "risk")])
    penalty = TaskCorrelationPenalty()(_as_torch(pred), _as_torch(target))
    assert penalty.item() == pytest.approx(expected, rel=1e-6)
    # With 4 subjects required, only mmse-cdr (5 subjects) is left.
    assert TaskCorrelationPenalty(min_subjects=4)(_as_torch(pred), _as_torch(target)).item() == pytest.approx(
        pair("mmse", "cdr"), rel=1e-6
    )


def test_task_correlation_penalty_zero_cases():
    generator = torch.Generator().manual_seed(0)
    target = {name: torch.randn(16, generator=generator, dtype=torch.float64) for name in ("mmse", "cdr", "risk")}
    target["cdr"][:4] = math.nan
    # A positive affine transform of every target (arbitrary where the target is missing).
    pred = {name: torch.nan_to_num(3.0 * t + 1.0, nan=7.0).requires_grad_() for name, t in target.items()}
    penalty = TaskCorrelationPenalty()(pred, target)
    assert penalty.item() < 1e-12
    # A negative transform of one task flips two correlations: the penalty is then clearly positive.
    flipped = dict(pred, risk=-pred["risk"])
    assert TaskCorrelationPenalty()(flipped, target).item() > 1e-3

    single = {"mmse": pred["mmse"]}
    loss = TaskCorrelationPenalty()(single, target)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(pred["mmse"].grad, torch.zeros(16, dtype=torch.float64))
    constant = {"mmse": torch.ones(16, dtype=torch.float64), "cdr": target["cdr"]}
    assert TaskCorrelationPenalty()(pred, constant).item() == 0.0  # a constant target: no pair
