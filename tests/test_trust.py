"""The statistics of jointray.trust on simulated draws: each guarantee within a binomial band, and each test
shown to fail on the broken method it guards against."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from jointray.trust.calibration import Calibration, InferenceSettings, fit_calibration
from jointray.trust.conformal import ConformalInterval, OrdinalSet
from jointray.trust.ood import FEATURES as OOD_FEATURES
from jointray.trust.ood import OutlierTest, feature_key, image_features
from jointray.trust.quality import FEATURES as QUALITY_FEATURES
from jointray.trust.quality import QualityModel, out_of_fold
from jointray.trust.quality import feature_key as quality_key
from jointray.trust.risk_control import missed, risk_control_threshold, risk_coverage
from jointray.trust.scaling import ProbabilityScaling, fit_scaling


def binomial_band(p: float, n: int, tail: float = 1e-4) -> tuple[float, float]:
    """The central 1 − 2·tail range of a Binomial(n, p) share."""
    return stats.binom.ppf(tail, n, p) / n, stats.binom.ppf(1 - tail, n, p) / n


# -- voxel scaling -----------------------------------------------------------------------------------------

def overconfident(temperature: np.ndarray, n: int = 200_000, seed: int = 0, bias: np.ndarray | None = None):
    """The model's probabilities p = softmax(z) and labels drawn from softmax(log p / T + b): overconfident for
    T > 1 (the family ProbabilityScaling fits, so its parameters are 1/T and b)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 3, size=(n, 3))
    model = np.exp(z - z.max(1, keepdims=True))
    model /= model.sum(1, keepdims=True)
    true_logits = np.log(model) / temperature + (0 if bias is None else bias)
    true = np.exp(true_logits - true_logits.max(1, keepdims=True))
    true /= true.sum(1, keepdims=True)
    labels = (rng.random(n)[:, None] > true.cumsum(1)).sum(1)
    return model, labels


def test_temperature_scaling_recovers_a_known_temperature():
    probabilities, labels = overconfident(np.array([2.0, 2.0, 2.0]))
    scaling = fit_scaling(probabilities, labels, "temperature")
    assert scaling.scale == pytest.approx((0.5, 0.5, 0.5), abs=0.01)
    assert scaling.bias == (0.0, 0.0, 0.0)
    # One shared temperature never changes the argmax.
    assert (scaling.apply(probabilities, axis=1).argmax(1) == probabilities.argmax(1)).all()


def test_class_temperatures_and_vector_bias_are_recovered():
    temperatures = np.array([1.0, 2.0, 4.0])
    probabilities, labels = overconfident(temperatures, seed=1)
    scaling = fit_scaling(probabilities, labels, "class_temperature")
    assert scaling.scale == pytest.approx(tuple(1 / temperatures), abs=0.02)
    bias = np.array([0.0, 0.7, -0.5])
    probabilities, labels = overconfident(np.ones(3), seed=2, bias=bias)
    vector = fit_scaling(probabilities, labels, "vector")
    assert vector.scale == pytest.approx((1, 1, 1), abs=0.02)
    assert vector.bias == pytest.approx(tuple(bias), abs=0.03)


def test_scaling_lowers_the_calibration_error_on_new_draws_only_when_fitted_on_like_cases():
    from jointray.metrics import class_calibration_error

    fit_p, fit_y = overconfident(np.array([2.0, 2.0, 2.0]), seed=3)
    test_p, test_y = overconfident(np.array([2.0, 2.0, 2.0]), seed=4)
    scaling = fit_scaling(fit_p, fit_y, "temperature")
    before = class_calibration_error(test_p, test_y)
    after = class_calibration_error(scaling.apply(test_p, axis=1), test_y)
    assert before > 0.05 and after < 0.01
    # Fitted on cases of another kind (well calibrated ones), it leaves the test cases overconfident.
    other_p, other_y = overconfident(np.array([1.0, 1.0, 1.0]), seed=5)
    wrong = fit_scaling(other_p, other_y, "temperature")
    assert class_calibration_error(wrong.apply(test_p, axis=1), test_y) > 0.05


def test_scaling_applies_near_the_predicted_structures_and_leaves_the_far_background():
    from jointray.trust.scaling import MARGIN

    foreground = np.full((20, 20, 20), 0.001, np.float32)
    foreground[8:12, 8:12, 8:12] = 0.9
    probabilities = np.stack([1 - foreground, foreground])
    calibrated = ProbabilityScaling(scale=(0.5, 0.5), bias=(0.0, 0.0)).apply_near(probabilities)
    assert calibrated[1, 10, 10, 10] < 0.9 and calibrated[1, 8 - MARGIN, 10, 10] > 0.001  # softened near it
    assert calibrated[1, 8 - MARGIN - 1, 10, 10] == pytest.approx(0.001)  # one step further: as it was
    assert calibrated[1, 0, 0, 0] == pytest.approx(0.001)
    np.testing.assert_allclose(calibrated.sum(0), 1, rtol=1e-6)


def test_identity_scaling_changes_nothing():
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], np.float32)
    np.testing.assert_allclose(ProbabilityScaling.identity(3).apply(p, axis=1), p, rtol=1e-6)


def test_the_foreground_ece_of_perfectly_calibrated_probabilities_is_not_zero_but_the_predicted_regions_is():
    """The evaluation's "foreground" region (prediction or reference a structure) is chosen with the labels' help;
    labels drawn from the probabilities themselves (calibrated by construction) still score well above 0 there,
    while the region the prediction alone chooses scores ~0. Why benchmarks/README.md reports both."""
    from jointray.metrics import bins_calibration_error, reliability_bins

    rng = np.random.default_rng(6)
    foreground = rng.beta(0.3, 0.3, 400_000)  # many confident voxels, some unsure ones, as at a border
    probabilities = np.stack([1 - foreground, foreground], axis=1)
    labels = (rng.random(len(foreground)) < foreground).astype(np.int64)
    predicted = probabilities.argmax(1) > 0

    def ece(region):
        return bins_calibration_error(reliability_bins(probabilities[region], labels[region]))

    assert ece(predicted | (labels > 0)) > 0.03
    assert ece(predicted) < 0.005


# -- conformal intervals ------------------------------------------------------------------------------------

def heteroscedastic(n: int, rng: np.random.Generator):
    """(truth, point, sigma): the model knows each case's noise SD up to a factor (its spread is informative)."""
    x = rng.uniform(0, 1, n)
    sigma = 0.2 + 2.0 * x
    return x * 10 + sigma * rng.standard_t(5, n), x * 10, sigma * 0.5


def conformal_coverage(repeats: int, n_cal: int, n_test: int, level: float, normalised: bool, seed: int = 0,
                       fit_on_test: bool = False):
    rng = np.random.default_rng(seed)
    hits = widths = 0.0
    for _ in range(repeats):
        truth, point, sigma = heteroscedastic(n_cal, rng)
        t_truth, t_point, t_sigma = heteroscedastic(n_test, rng)
        if fit_on_test:  # the mistake: the test cases calibrate themselves (the quantile without the +1)
            truth, point, sigma = t_truth, t_point, t_sigma
        interval = ConformalInterval.fit(truth, point, sigma if normalised else None)
        bounds = interval.interval(t_point, t_sigma if normalised else None, level)
        hits += ((bounds[:, 0] <= t_truth) & (t_truth <= bounds[:, 1])).sum()
        widths += (bounds[:, 1] - bounds[:, 0]).sum()
    return hits / (repeats * n_test), widths / (repeats * n_test)


@pytest.mark.parametrize("normalised", [False, True])
def test_split_conformal_interval_covers_at_its_level(normalised):
    level, n_cal, repeats, n_test = 0.9, 19, 400, 25
    coverage, _ = conformal_coverage(repeats, n_cal, n_test, level, normalised)
    # Exact for continuous scores: E[coverage] = ⌈(n + 1)·level⌉ / (n + 1) = 18/20 here.
    low, high = binomial_band(0.9, repeats * n_test, tail=1e-3)
    # Test points share a calibration set within a repeat: widen the band by the repeats' own spread.
    slack = 2.5 * math.sqrt(level * (1 - level) / (n_cal + 2) / repeats)
    assert low - slack <= coverage <= high + slack


def test_a_conformal_interval_calibrated_on_its_own_test_cases_is_caught_by_the_band():
    """Calibrated on the cases it is scored on, the interval holds 18 of its own 19 scores (0.947): outside the
    band the test above holds the honest interval to, so that test fails for this mistake."""
    coverage, _ = conformal_coverage(400, 19, 19, 0.9, True, fit_on_test=True)
    low, high = binomial_band(0.9, 400 * 19, tail=1e-3)
    slack = 2.5 * math.sqrt(0.9 * 0.1 / 21 / 400)
    assert not low - slack <= coverage <= high + slack


def test_normalised_intervals_are_narrower_where_the_model_is_sure():
    rng = np.random.default_rng(7)
    truth, point, sigma = heteroscedastic(500, rng)
    interval = ConformalInterval.fit(truth, point, sigma)
    bounds = interval.interval([5.0, 5.0], [0.1, 1.0], 0.9)
    widths = bounds[:, 1] - bounds[:, 0]
    assert widths[1] == pytest.approx(10 * widths[0])
    _, width_normalised = conformal_coverage(200, 100, 50, 0.9, True, seed=8)
    _, width_plain = conformal_coverage(200, 100, 50, 0.9, False, seed=8)
    assert width_normalised < width_plain


def test_mondrian_intervals_cover_within_each_group():
    rng = np.random.default_rng(9)
    hits = {"a": [], "b": []}
    for _ in range(300):
        groups = rng.choice(["a", "b"], 60)
        noise = np.where(groups == "a", 0.1, 3.0)
        truth = noise * rng.normal(size=60)
        interval = ConformalInterval.fit(truth, np.zeros(60), bins=groups)
        t_groups = np.array(["a", "b"] * 5)
        t_truth = np.where(t_groups == "a", 0.1, 3.0) * rng.normal(size=10)
        bounds = interval.interval(np.zeros(10), None, 0.8, bins=t_groups)
        inside = (bounds[:, 0] <= t_truth) & (t_truth <= bounds[:, 1])
        for g in hits:
            hits[g] += inside[t_groups == g].tolist()
    for g, inside in hits.items():
        assert 0.77 <= np.mean(inside) <= 0.86, g


def test_too_few_calibration_cases_give_an_infinite_interval():
    interval = ConformalInterval.fit([1.0, 2.0, 3.0], [1.1, 2.1, 2.9])
    assert np.isinf(interval.interval([2.0], None, 0.9)).all()


# -- ordinal sets -------------------------------------------------------------------------------------------

def ordinal_draws(n: int, rng: np.random.Generator):
    centre = rng.uniform(0, 3, n)
    logits = -((np.arange(4)[None, :] - centre[:, None]) ** 2)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    truth = (rng.random(n)[:, None] > p.cumsum(1)).sum(1)
    return p, truth


def test_ordinal_sets_cover_and_are_contiguous():
    rng = np.random.default_rng(11)
    hits, sizes, total = 0, 0, 0
    for _ in range(300):
        p, truth = ordinal_draws(50, rng)
        sets = OrdinalSet.fit(p, truth).sets(*ordinal_draws(20, rng)[:1], level=0.9)
        t_p, t_truth = ordinal_draws(20, rng)
        sets = OrdinalSet.fit(p, truth).sets(t_p, level=0.9)
        for row, y in zip(sets, t_truth):
            members = np.flatnonzero(row)
            assert len(members) and (np.diff(members) == 1).all()
            hits += bool(row[y])
            sizes += len(members)
            total += 1
    assert hits / total >= binomial_band(0.9, total, tail=1e-3)[0] - 0.01
    assert sizes / total < 4  # informative: not every stage


def test_a_cdr_above_the_heads_last_class_counts_as_that_class():
    from jointray.metrics.trust import cdr_set_coverage

    rows = [{"cdr": 3.0, "cdr_set": "1|2"}, {"cdr": 0.0, "cdr_set": "0.5|1"}, {"cdr": 2.0, "cdr_set": "2"}]
    assert cdr_set_coverage(rows, 4) == {"cdr_set_coverage": pytest.approx(2 / 3), "cdr_set_size": pytest.approx(5 / 3)}
    settings = InferenceSettings(mirror=True, mc_samples=1, mc_mode="decoder")
    fitted = fit_calibration([{"cdr": c, "prob_cdr/0": 0.1, "prob_cdr/0.5": 0.2, "prob_cdr/1": 0.3, "prob_cdr/2": 0.4}
                              for c in (3.0, 2.0, 0.0)] * 10, [], settings, cdr_stages=["0", "0.5", "1", "2"],
                             ood_alpha=0.05)
    assert sorted(set(np.round(fitted.cdr.scores, 6))) == [0.6, 0.9]  # 3 and 2 both class "2" (p 0.4)


# -- conformal risk control ---------------------------------------------------------------------------------

def quality_draws(n: int, rng: np.random.Generator, noise: float = 0.1):
    """(predicted worst Dice, failed): a noisy predictor of the true Dice; about a quarter of the cases fail."""
    true = rng.beta(12, 2, n)
    return np.clip(true + rng.normal(0, noise, n), 0, 1), true < 0.8


def missed_rates(repeats: int, threshold_of, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per repeat, the missed-failure rate and the flagged share on 200 new cases, at ``threshold_of(quality,
    failed)`` of 60 calibration cases."""
    rng = np.random.default_rng(seed)
    rates, flagged = [], []
    for _ in range(repeats):
        threshold = threshold_of(*quality_draws(60, rng))
        t_q, t_failed = quality_draws(200, rng)
        rates.append(missed(t_q, t_failed, threshold).mean())
        flagged.append((t_q < threshold).mean())
    return np.array(rates), np.array(flagged)


def test_risk_control_bounds_the_missed_failures_on_new_cases():
    alpha = 0.05
    rates, flagged = missed_rates(400, lambda q, failed: risk_control_threshold(q, failed, alpha), seed=12)
    # E[missed] <= alpha; the mean of 400 repeats carries Monte Carlo error.
    assert rates.mean() <= alpha + 3 * rates.std() / math.sqrt(len(rates))
    assert flagged.mean() < 0.6  # it is not flagging everything to get there


def test_a_threshold_without_risk_control_misses_more_than_alpha():
    """The naive flag (predicted Dice below the failure level itself) misses the failures a noisy predictor ranks
    high: the check above fails for it."""
    rates, _ = missed_rates(400, lambda q, failed: 0.8, seed=13)
    assert rates.mean() > 0.05 + 3 * rates.std() / math.sqrt(len(rates))


def test_risk_control_with_no_failures_flags_nothing_and_with_few_cases_everything():
    assert risk_control_threshold(np.linspace(0.8, 0.95, 40), np.zeros(40, bool), 0.05) == -math.inf
    assert risk_control_threshold(np.linspace(0.8, 0.95, 10), np.zeros(10, bool), 0.05) == math.inf


def test_risk_coverage_curve():
    quality = np.array([0.9, 0.8, 0.7, 0.6])
    dice = np.array([0.9, 0.8, 0.7, 0.6])
    curve = risk_coverage(quality, dice)
    assert curve["aurc"] == pytest.approx(curve["optimal_aurc"])
    errors = 1 - dice
    expected = np.mean([errors[:k].mean() for k in range(1, 5)])
    assert curve["aurc"] == pytest.approx(expected)
    assert risk_coverage(quality[::-1].copy(), dice)["aurc"] > curve["aurc"]


# -- quality and out of distribution -------------------------------------------------------------------------

def test_quality_model_recovers_a_linear_relation_and_cross_fits():
    rng = np.random.default_rng(14)
    features = rng.normal(size=(80, 2, len(QUALITY_FEATURES)))
    dice = np.clip(0.85 + 0.05 * features[..., 0] - 0.02 * features[..., 3] + rng.normal(0, 0.005, (80, 2)), 0, 1)
    model = QualityModel.fit(features.reshape(-1, len(QUALITY_FEATURES)), dice.reshape(-1))
    predicted = model.predict(features)
    assert np.abs(predicted - dice).mean() < 0.01
    oof = out_of_fold(features, dice)
    assert np.abs(oof - dice).mean() < 0.015
    assert model.predict(np.full(len(QUALITY_FEATURES), np.nan)) == 0.0


def test_outlier_test_false_flags_at_most_alpha_and_catches_the_far_ones():
    rng = np.random.default_rng(15)
    alpha, flagged, total = 0.05, 0, 0
    for _ in range(200):
        test = OutlierTest.fit(rng.normal(size=(59, len(OOD_FEATURES))))
        for features in rng.normal(size=(10, len(OOD_FEATURES))):
            flagged += test.p_value(features) <= alpha
            total += 1
    assert flagged / total <= binomial_band(alpha, total, tail=1e-3)[1]
    assert flagged / total >= binomial_band(alpha, total, tail=1e-3)[0]  # and it does flag: p-values are exact
    far = np.zeros(len(OOD_FEATURES))
    far[2] = 20.0
    assert test.p_value(far) == pytest.approx(1 / 60)
    assert test.reason(far).startswith(f"{OOD_FEATURES[2]} 20 is")


def test_image_features_tell_anatomy_from_noise_and_inversion():
    rng = np.random.default_rng(16)
    x = np.linspace(-1, 1, 32)
    blob = np.exp(-(x[:, None, None] ** 2 + x[None, :, None] ** 2 + x[None, None, :] ** 2) * 3) * 200
    anatomy = image_features(blob + rng.normal(0, 2, blob.shape))
    noise = image_features(rng.normal(100, 30, blob.shape))
    inverted = image_features(blob.max() - blob)
    assert anatomy["smoothness"] > 0.8 and abs(noise["smoothness"]) < 0.05
    assert anatomy["skewness"] > 0 > inverted["skewness"]
    assert image_features(blob - 1000)["negative_fraction"] == 1.0


# -- the whole calibration from rows -------------------------------------------------------------------------

def test_fit_calibration_from_rows_round_trips_through_json():
    rng = np.random.default_rng(17)
    rows = []
    for i in range(40):
        row = {"subject_id": f"s{i}", "mmse": float(rng.integers(10, 30)), "pred_mmse": 20.0, "pred_mmse_sd": 2.0}
        for name in ("a", "b"):
            dice = float(np.clip(rng.normal(0.85, 0.05), 0, 1))
            row |= {f"volume/{name}": 1000.0, f"volume_ref/{name}": float(rng.normal(1000, 50)),
                    f"volume_sd/{name}": 30.0, f"dice/{name}": dice}
            row |= {quality_key(name, f): dice + rng.normal(0, 0.01) if f == "expected_dice" else rng.random()
                    for f in QUALITY_FEATURES}
        row |= {feature_key(f): rng.normal() for f in OOD_FEATURES}
        rows.append(row)
    settings = InferenceSettings(mirror=True, mc_samples=10, mc_mode="decoder")
    calibration = fit_calibration(rows, ["a", "b"], settings, failure_dice=0.8, review_alpha=0.1, ood_alpha=0.05)
    assert calibration.volume["a"].normalised and calibration.mmse is not None and calibration.cdr is None
    assert calibration.quality is not None and calibration.ood is not None
    # About a third of these cases fail (a structure below 0.8), far above α = 0.1: the flag must flag some.
    assert math.isfinite(calibration.review_threshold)
    again = Calibration.model_validate_json(calibration.model_dump_json())
    assert again == calibration
    assert again.settings_match(True, 10, "decoder") and not again.settings_match(True, 1, "decoder")
    assert "at least 90%" in again.coverage_sentence() and "40 calibration cases" in again.coverage_sentence()
    # 40 cases cannot reach a p-value of 0.02 (1/41 is the smallest): refused, not a flag that never fires.
    with pytest.raises(ValueError, match="ood_alpha=0.02 needs at least 49 calibration cases"):
        fit_calibration(rows, ["a", "b"], settings, ood_alpha=0.02)
