"""``jointray calibrate`` end to end on real MSD MRI: fitted on held-back cases, checked on others."""

import math

import numpy as np
import pytest
from conftest import MSD_TRAIN_CASES as TRAIN_CASES
from conftest import msd_held_out, msd_subset, shared_data

from jointray.artifacts import load_models
from jointray.inference.answers import answer
from jointray.inference.calibrate import calibrate
from jointray.inference.evaluate import evaluate
from jointray.inference.predictor import Predictor

CALIBRATION_CASES, TEST_CASES = 30, 20


@pytest.fixture(scope="module")
def calibrated(msd_checkpoint, tmp_path_factory):
    """(calibrated model, its calibration, the test cases' folder): calibrated on 30 cases the checkpoint never
    saw, with 4 Monte Carlo samples; 20 further cases to check it on."""
    msd = shared_data("msd_hippocampus")
    root = tmp_path_factory.mktemp("calibrate")
    cal, _ = msd_subset(msd, root / "calibration_cases", TRAIN_CASES, CALIBRATION_CASES)
    test, _ = msd_subset(msd, root / "test_cases", TRAIN_CASES + CALIBRATION_CASES, TEST_CASES)
    # 30 cases: the smallest conformal p-value is 1/31, so the OOD test runs at 5 % (the default 2 % needs 49).
    calibration, folder = calibrate(msd_checkpoint, cal, root / "calibrated", mc_samples=4, mc_mode="decoder",
                                    ood_alpha=0.05)
    return folder, calibration, test


def test_the_calibration_is_fitted_on_the_calibration_cases_and_stored_with_the_model(calibrated, msd_checkpoint):
    folder, calibration, _ = calibrated
    assert calibration.cases == CALIBRATION_CASES
    assert calibration.settings.mc_samples == 4 and calibration.settings.mirror
    # The scaling was chosen by held-out NLL, and it beats doing nothing there.
    nll = {k.removeprefix("heldout_nll/"): v for k, v in calibration.fit_metrics.items() if k.startswith("heldout_nll")}
    assert calibration.scaling_method == min(nll, key=nll.get)
    assert nll[calibration.scaling_method] <= nll["none"]
    assert set(calibration.volume) == {"anterior", "posterior"} and calibration.volume["anterior"].normalised
    assert calibration.quality is not None and calibration.ood is not None
    loaded = load_models(folder)
    assert loaded.calibration == calibration
    assert loaded.version != load_models(msd_checkpoint).version  # a calibrated model is a new model id


def test_calibrated_evaluation_is_better_calibrated_on_new_cases_and_keeps_dice(calibrated, msd_checkpoint, tmp_path):
    folder, calibration, test = calibrated
    plain = evaluate(msd_checkpoint, test, tmp_path / "plain", mc_samples=4, mc_mode="decoder")
    honest = evaluate(folder, test, tmp_path / "calibrated")  # defaults: the calibration's settings
    assert honest.calibrated and (honest.mc_samples, honest.mc_mode, honest.tta) == (4, "decoder", True)
    before, after = plain.metrics["voxel_ece/foreground"], honest.metrics["voxel_ece/foreground"]
    assert after < before, (before, after)
    dice_drop = plain.metrics["dice"] - honest.metrics["dice"]
    assert dice_drop <= (0.002 if calibration.mask_calibrated else 0.0)
    # Conformal volume intervals on 2 × 20 new cases: 90 % nominal; below 70 % has probability < 1e-3.
    inside = [honest.metrics[f"volume_interval_coverage/{n}"] for n in ("anterior", "posterior")]
    assert np.mean(inside) >= 0.7, inside
    for row in honest.rows:
        assert 0 <= row["volume_low/anterior"] <= row["volume/anterior"] <= row["volume_high/anterior"]
        assert 0 <= row["predicted_dice/anterior"] <= 1
        assert math.isfinite(row["ood_p"])
    # The uncalibrated model's rows carry Monte Carlo intervals and no predicted Dice.
    assert "predicted_dice/anterior" not in plain.rows[0]
    assert honest.metrics["failures"] >= 0 and 0 <= honest.metrics["missed_failure_rate"] <= 1


def test_the_answer_says_what_its_figures_promise_and_flags_inputs_unlike_the_calibration(calibrated):
    folder, calibration, _ = calibrated
    predictor = Predictor(folder)
    assert predictor.check_mc(None, None) == (4, "decoder")
    image, _ = msd_held_out(CALIBRATION_CASES + TEST_CASES)
    case = predictor.prepare(image)
    samples, mode = predictor.check_mc(None, None)
    prediction = predictor.finish(case, predictor.forward([case], samples, mode)[0], samples, mode)
    body = answer(predictor, case, prediction, {})
    assert body["trust"]["calibrated"] and body["trust"]["statement"] == calibration.coverage_sentence(0.9)
    assert body["structures"]["anterior"]["volume_mm3"]["interval_method"] == "conformal_normalised"
    assert body["trust"]["ood_p_value"] > calibration.ood_alpha
    # Noise of the same size and intensity range: not a hippocampus, and the answer says so.
    rng = np.random.default_rng(0)
    noise = rng.uniform(0, float(case.original.max()), case.original.shape[1:]).astype(np.float32)
    odd = predictor.prepare((noise, case.geometry.original_affine), name="noise")
    flagged = predictor.finish(odd, predictor.forward([odd], samples, mode)[0], samples, mode)
    needs_review, reasons = predictor.review(flagged)
    assert needs_review and reasons[0].startswith("input unlike the calibration cases"), reasons
    # The reason names the statistic furthest out: no anatomy (smoothness) or no confident structure.
    assert any(f"{feature} " in reasons[0] for feature in ("smoothness", "expected_dice")), reasons[0]
    # One deterministic pass has no spread: its intervals are conformal with one width for all.
    single = predictor.finish(case, predictor.forward([case], 1, mode)[0], 1, mode)
    assert single.volume_estimates["anterior"].method == "conformal"


def test_a_joint_model_gets_conformal_outcome_intervals_a_cdr_set_and_an_absolute_risk(one_epoch, tmp_path):
    """The synthetic joint model (conftest's one-epoch fold ensemble, outcome heads trained) calibrated on 24 new
    subjects: every outcome it reports gets its calibrated form."""
    from jointray.data.synthetic import generate_cohort

    ensemble, _ = one_epoch
    cohort = generate_cohort(tmp_path / "calibration", 24, seed=5)
    calibration, folder = calibrate(ensemble, cohort, tmp_path / "calibrated", mc_samples=2, ood_alpha=0.05)
    assert calibration.mmse is not None and calibration.mmse.normalised and calibration.cdr is not None
    assert calibration.risk is not None and calibration.risk.events >= 2
    predictor = Predictor(folder)
    case = predictor.prepare(tmp_path / "calibration" / "images" / "sub-0000.nii.gz",
                             clinical={"age": 70.0, "sex": "F", "education_years": 12.0, "apoe4": 1.0})
    samples, mode = predictor.check_mc(None, None)
    prediction = predictor.finish(case, predictor.forward([case], samples, mode)[0], samples, mode)
    body = answer(predictor, case, prediction, {})
    outcomes = body["outcomes"]
    assert outcomes["mmse"]["interval_method"] == "conformal_normalised"
    low, high = outcomes["mmse"]["interval"]
    assert 0 <= low <= outcomes["mmse"]["point"] <= high <= 30
    stages = list(outcomes["cdr"]["probabilities"])
    chosen = [stages.index(s) for s in outcomes["cdr"]["set"]]
    assert chosen == list(range(chosen[0], chosen[-1] + 1))  # contiguous stages
    horizon = outcomes["risk_by_horizon"]
    assert horizon["horizon"] == calibration.risk.horizon and 0 < horizon["probability"] < 1
    assert prediction.row()["pred_risk_probability"] == horizon["probability"]
