"""Metrics, checked against reference implementations (MONAI, lifelines, scikit-learn, torchmetrics,
scipy) and against values worked out by hand."""

from __future__ import annotations

import contextlib
import itertools
import math
import warnings

import numpy as np
import pytest
import torch
from lifelines.utils import concordance_index as lifelines_concordance_index
from monai.metrics import (
    compute_average_surface_distance,
    compute_dice,
    compute_hausdorff_distance,
    compute_iou,
)
from monai.networks.utils import one_hot
from scipy import ndimage, stats
from scipy.spatial.distance import cdist
from sklearn.metrics import accuracy_score, cohen_kappa_score, f1_score
from torchmetrics.classification import MulticlassCalibrationError

from jointray.data.clinical import ClinicalSchema
from jointray.losses.ordinal import cdr_to_class
from jointray.metrics import (
    BIN_CONFIDENCE,
    BIN_COUNT,
    MISSING,
    bins_calibration_error,
    bland_altman,
    class_calibration_error,
    concordance_index,
    flatten_voxels,
    interval_coverage,
    intraclass_correlation,
    ordinal_metrics,
    regression_metrics,
    reliability_bins,
    segmentation_metrics,
    structure_volumes,
    summarize,
    volume_metrics,
    voxel_calibration_error,
)
from jointray.metrics.cohort import validation_keys, validation_metrics, volume_agreement
from jointray.metrics.risk_groups import risk_groups
from jointray.metrics.trust import uncertainty_and_review
from jointray.tasks import JointOutput
from jointray.train.batches import to_model_batch
from jointray.train.validation import predict_cases

SPACING = (0.8, 1.0, 2.5)
STRUCTURES = {1: "anterior", 2: "posterior"}


# --- segmentation ----------------------------------------------------------------------------------


def _blob_labels(rng: np.random.Generator, shape=(22, 20, 12), batch=2) -> tuple[torch.Tensor, torch.Tensor]:
    """Target and a perturbed prediction: smooth random blobs, label 1 on high values, 2 on low ones."""
    target, pred = [], []
    for _ in range(batch):
        field = ndimage.gaussian_filter(rng.normal(size=shape), sigma=2.0)
        noisy = field + 0.4 * ndimage.gaussian_filter(rng.normal(size=shape), sigma=1.5)
        for out, f in ((target, field), (pred, noisy)):
            hi, lo = np.quantile(field, [0.8, 0.15])
            out.append(np.where(f > hi, 1, np.where(f < lo, 2, 0)))
    return torch.as_tensor(np.stack(pred)), torch.as_tensor(np.stack(target))


def _surface_distances_by_brute_force(pred: np.ndarray, target: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Directed distances (mm) between boundary voxels (mask minus its 6-connected erosion)."""
    points = []
    for mask in (pred, target):
        edge = mask & ~ndimage.binary_erosion(mask)
        points.append(np.argwhere(edge) * np.asarray(spacing))
    d = cdist(points[0], points[1])
    return d.min(axis=1), d.min(axis=0)


@pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")  # MONAI-internal deprecation
def test_segmentation_matches_monai_one_hot_and_brute_force():
    pred, target = _blob_labels(np.random.default_rng(0))
    ours = segmentation_metrics(pred, target, STRUCTURES, SPACING)

    # MONAI on its own one-hot encoding of the full label maps (background channel dropped).
    p1, t1 = one_hot(pred[:, None], num_classes=3), one_hot(target[:, None], num_classes=3)
    reference = {
        "dice": compute_dice(p1, t1, include_background=False),
        "iou": compute_iou(p1, t1, include_background=False),
        "hd95": compute_hausdorff_distance(p1, t1, percentile=95, spacing=SPACING),
        "assd": compute_average_surface_distance(p1, t1, symmetric=True, spacing=SPACING),
    }
    for metric, values in reference.items():
        for s, name in enumerate(STRUCTURES.values()):
            torch.testing.assert_close(ours[f"{metric}/{name}"], values[:, s].float(), rtol=0, atol=0)

    # An independent computation of the same definitions.
    for b in range(pred.shape[0]):
        for label, name in STRUCTURES.items():
            p, t = pred[b].numpy() == label, target[b].numpy() == label
            to_target, to_pred = _surface_distances_by_brute_force(p, t, SPACING)
            hd95 = max(np.percentile(to_target, 95), np.percentile(to_pred, 95))
            assd = np.concatenate([to_target, to_pred]).mean()
            dice = 2 * (p & t).sum() / (p.sum() + t.sum())
            assert ours[f"hd95/{name}"][b].item() == pytest.approx(hd95, rel=1e-5)
            assert ours[f"assd/{name}"][b].item() == pytest.approx(assd, rel=1e-5)
            assert ours[f"dice/{name}"][b].item() == pytest.approx(dice, rel=1e-6)
            assert ours[f"iou/{name}"][b].item() == pytest.approx((p & t).sum() / (p | t).sum(), rel=1e-6)


@pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")  # MONAI-internal deprecation
def test_segmentation_per_sample_spacing_and_structure_subset():
    pred, target = _blob_labels(np.random.default_rng(1))
    spacings = [(0.8, 1.0, 2.5), (1.2, 0.7, 1.5)]
    ours = segmentation_metrics(pred, target, [2], spacings)
    assert set(ours) == {"dice/2", "iou/2", "hd95/2", "assd/2", "missed/2"}
    for b, spacing in enumerate(spacings):
        p, t = (pred[b : b + 1] == 2).float()[:, None], (target[b : b + 1] == 2).float()[:, None]
        hd95 = compute_hausdorff_distance(p, t, include_background=True, percentile=95, spacing=spacing)
        assd = compute_average_surface_distance(p, t, include_background=True, symmetric=True, spacing=spacing)
        assert ours["hd95/2"][b].item() == hd95.item()
        assert ours["assd/2"][b].item() == assd.item()
    # Spacing matters: the same masks at isotropic 1 mm give other distances.
    assert not torch.equal(ours["hd95/2"], segmentation_metrics(pred, target, [2], (1.0, 1.0, 1.0))["hd95/2"])


@pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")  # MONAI-internal deprecation
def test_segmentation_computes_only_the_distances_asked_for():
    pred, target = _blob_labels(np.random.default_rng(2))
    full = segmentation_metrics(pred, target, STRUCTURES, SPACING)
    hd95_only = segmentation_metrics(pred, target, STRUCTURES, SPACING, distances=("hd95",))
    assert set(full) - set(hd95_only) == {f"assd/{name}" for name in STRUCTURES.values()}
    for key, values in hd95_only.items():
        torch.testing.assert_close(values, full[key], rtol=0, atol=0)
    overlaps = segmentation_metrics(pred, target, STRUCTURES, SPACING, distances=())
    assert {key.split("/")[0] for key in overlaps} == {"dice", "iou", "missed"}
    with pytest.raises(ValueError, match="hd99"):
        segmentation_metrics(pred, target, STRUCTURES, SPACING, distances=("hd99",))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_cubes_offset_along_thick_axis(k):
    """Two 6³ cubes, one shifted by k voxels along the 2.5 mm axis: the cap the other cube does not
    reach (36 of the 152 boundary voxels, over 5 %) lies exactly 2.5·k mm from the other surface and
    the rest closer, so both directed 95th percentiles are 2.5·k mm."""
    side = 6
    target = torch.zeros(1, 16, 16, 16, dtype=torch.long)
    pred = torch.zeros_like(target)
    target[0, 5 : 5 + side, 5 : 5 + side, 3 : 3 + side] = 1
    pred[0, 5 : 5 + side, 5 : 5 + side, 3 + k : 3 + k + side] = 1
    out = segmentation_metrics(pred, target, {1: "cube"}, SPACING)
    assert out["hd95/cube"].item() == pytest.approx(2.5 * k, abs=1e-6)
    assert out["dice/cube"].item() == pytest.approx((side - k) / side)
    assert out["iou/cube"].item() == pytest.approx((side - k) / (side + k))
    assert 0 < out["assd/cube"].item() < 2.5 * k


def test_segmentation_empty_cases_are_documented_values_without_warnings():
    target = torch.zeros(3, 8, 8, 8, dtype=torch.long)
    pred = torch.zeros_like(target)
    target[1, 2:5, 2:5, 2:5] = 1  # sample 1: prediction empty (a miss)
    pred[2, 2:5, 2:5, 2:5] = 1  # sample 2: reference empty; sample 0: both empty
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = segmentation_metrics(pred, target, {1: "a"}, SPACING)
    torch.testing.assert_close(out["dice/a"], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(out["iou/a"], torch.tensor([1.0, 0.0, 0.0]))
    # One mask empty: the worst case, the diagonal of the 8 × 8 × 8 image box in mm.
    diagonal = np.sqrt((8 * 0.8) ** 2 + (8 * 1.0) ** 2 + (8 * 2.5) ** 2)
    for metric in ("hd95/a", "assd/a"):
        assert torch.isnan(out[metric][0])  # both empty: no surface to measure, left out of the means
        assert out[metric][1].item() == pytest.approx(diagonal, rel=1e-6)
        assert out[metric][2].item() == pytest.approx(diagonal, rel=1e-6)
    torch.testing.assert_close(out["missed/a"], torch.tensor([0.0, 1.0, 0.0]))


@pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")  # MONAI-internal deprecation
def test_a_miss_scores_worse_than_any_found_structure_with_per_sample_spacing():
    """The worst case follows each sample's spacing and exceeds every distance MONAI can return on that grid:
    two single voxels in opposite corners are as far apart as voxel centres get."""
    spacings = [(0.8, 1.0, 2.5), (1.5, 0.5, 1.0)]
    target = torch.zeros(2, 10, 7, 5, dtype=torch.long)
    target[:, 0, 0, 0] = 1
    pred = torch.zeros_like(target)
    pred[0, -1, -1, -1] = 1  # sample 0: found, as far off as possible
    out = segmentation_metrics(pred, target, {1: "a"}, spacings)
    farthest = np.sqrt((9 * 0.8) ** 2 + (6 * 1.0) ** 2 + (4 * 2.5) ** 2)
    assert out["hd95/a"][0].item() == pytest.approx(farthest, rel=1e-6)
    diagonal = np.sqrt((10 * 1.5) ** 2 + (7 * 0.5) ** 2 + (5 * 1.0) ** 2)
    assert out["hd95/a"][1].item() == pytest.approx(diagonal, rel=1e-6)
    assert out["assd/a"][1].item() == pytest.approx(diagonal, rel=1e-6)
    assert np.sqrt((10 * 0.8) ** 2 + (7 * 1.0) ** 2 + (5 * 2.5) ** 2) > farthest
    torch.testing.assert_close(out["missed/a"], torch.tensor([0.0, 1.0]))


def test_summarize_skips_undefined_values():
    summary = summarize({"hd95/a": torch.tensor([1.0, float("nan"), 3.0]), "dice/a": np.array([1.0, 0.0, 0.5])})
    assert summary["hd95/a/mean"] == 2.0 and summary["hd95/a/n"] == 2
    assert summary["hd95/a/sd"] == pytest.approx(np.sqrt(2.0))
    assert summary["dice/a/mean"] == 0.5 and summary["dice/a/n"] == 3


# --- volumes and agreement -------------------------------------------------------------------------


def test_structure_volume_of_known_cubes_in_mm3():
    label = torch.zeros(2, 12, 12, 12, dtype=torch.uint8)
    label[:, 1:5, 1:6, 1:7] = 1  # 4·5·6 = 120 voxels
    label[:, 8:10, 8:10, 8:10] = 2  # 8 voxels
    volumes = structure_volumes(label, STRUCTURES, [(0.8, 1.0, 2.5), (1.0, 1.0, 1.0)])
    torch.testing.assert_close(volumes["anterior"], torch.tensor([240.0, 120.0], dtype=torch.float64))
    torch.testing.assert_close(volumes["posterior"], torch.tensor([16.0, 8.0], dtype=torch.float64))


def test_volume_errors_per_case():
    target = torch.zeros(2, 10, 10, 10, dtype=torch.long)
    pred = torch.zeros_like(target)
    target[0, :4, :5, :5] = 1  # 100 voxels · 2 mm³
    pred[0, :5, :5, :5] = 1  # 125 voxels
    pred[1, :2, :2, :2] = 1  # reference empty in sample 1
    out = volume_metrics(pred, target, {1: "a"}, SPACING)
    torch.testing.assert_close(out["volume_ref/a"], torch.tensor([200.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(out["volume_abs_error/a"], torch.tensor([50.0, 16.0], dtype=torch.float64))
    assert out["volume_rel_error/a"][0].item() == pytest.approx(0.25)
    assert torch.isnan(out["volume_rel_error/a"][1])


def _icc_by_anova_loops(table: np.ndarray) -> float:
    """Shrout & Fleiss ICC(2,1) written out term by term from the two-way ANOVA sums of squares."""
    n, k = table.shape
    grand = table.sum() / (n * k)
    ss_rows = sum(k * (table[i].mean() - grand) ** 2 for i in range(n))
    ss_cols = sum(n * (table[:, j].mean() - grand) ** 2 for j in range(k))
    ss_total = sum((table[i, j] - grand) ** 2 for i in range(n) for j in range(k))
    bms, jms = ss_rows / (n - 1), ss_cols / (k - 1)
    ems = (ss_total - ss_rows - ss_cols) / ((n - 1) * (k - 1))
    return (bms - ems) / (bms + (k - 1) * ems + k * (jms - ems) / n)


def test_icc_matches_shrout_fleiss_table_and_hand_formula():
    # Shrout & Fleiss (1979), Table 2: 6 targets rated by 4 judges; published ICC(2,1) = .29.
    table = np.array([[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]], float)
    icc = intraclass_correlation(*table.T)
    assert round(icc, 2) == 0.29
    assert icc == pytest.approx(_icc_by_anova_loops(table), rel=1e-12)

    rng = np.random.default_rng(3)
    reference = rng.normal(3000, 400, size=25)
    pred = reference + rng.normal(50, 150, size=25)
    assert intraclass_correlation(pred, reference) == pytest.approx(
        _icc_by_anova_loops(np.stack([pred, reference], 1)), rel=1e-12
    )


def test_icc_is_one_for_identical_and_falls_with_noise_and_offset():
    rng = np.random.default_rng(4)
    reference = rng.normal(3000, 400, size=40)
    noise = rng.normal(size=40)
    assert intraclass_correlation(reference, reference) == pytest.approx(1.0, abs=1e-12)
    iccs = [intraclass_correlation(reference + sd * noise, reference) for sd in (0, 50, 200, 800)]
    assert iccs[0] == pytest.approx(1.0) and all(a > b for a, b in itertools.pairwise(iccs))
    # Absolute agreement: a constant offset lowers the ICC although the correlation stays 1.
    assert intraclass_correlation(reference + 300, reference) < 0.9
    # Incomplete subjects are left out.
    with_gap = np.append(reference, np.nan)
    assert intraclass_correlation(with_gap, np.append(reference, 1.0)) == pytest.approx(1.0, abs=1e-12)


def test_bland_altman_matches_hand_formula():
    pred = torch.tensor([10.0, 12.0, 14.0, 11.0, float("nan")])
    reference = np.array([9.0, 12.0, 15.0, 10.0, 3.0])
    ba = bland_altman(pred, reference)
    diff = np.array([1.0, 0.0, -1.0, 1.0])
    sd = np.sqrt(np.sum((diff - 0.25) ** 2) / 3)
    assert ba.n == 4 and ba.bias == pytest.approx(0.25) and ba.sd == pytest.approx(sd)
    assert ba.lower == pytest.approx(0.25 - 1.96 * sd) and ba.upper == pytest.approx(0.25 + 1.96 * sd)


# --- outcome scores --------------------------------------------------------------------------------


def test_regression_metrics_match_numpy_and_scipy_on_present_targets():
    rng = np.random.default_rng(5)
    target = rng.normal(25, 3, size=60)
    pred = target + rng.normal(0.5, 2, size=60)
    target[rng.random(60) < 0.25] = np.nan
    out = regression_metrics(torch.tensor(pred, dtype=torch.float32), torch.tensor(target))
    keep = ~np.isnan(target)
    p, t = pred.astype(np.float32).astype(np.float64)[keep], target[keep]
    assert out["n"] == keep.sum()
    assert out["mae"] == pytest.approx(np.mean(np.abs(p - t)), rel=1e-12)
    assert out["rmse"] == pytest.approx(np.sqrt(np.mean((p - t) ** 2)), rel=1e-12)
    assert out["r2"] == pytest.approx(1 - np.sum((p - t) ** 2) / np.sum((t - t.mean()) ** 2), rel=1e-12)
    assert out["pearson"] == pytest.approx(stats.pearsonr(p, t).statistic, rel=1e-12)


def test_regression_metrics_undefined_without_enough_targets():
    out = regression_metrics(torch.tensor([1.0, 2.0]), torch.tensor([float("nan"), 3.0]))
    assert out["n"] == 1 and out["mae"] == 1.0 and np.isnan(out["r2"]) and np.isnan(out["pearson"])
    assert np.isnan(regression_metrics(torch.tensor([1.0]), torch.tensor([float("nan")]))["mae"])


@pytest.mark.parametrize("seed", range(3))
def test_ordinal_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    target = rng.choice(4, size=150, p=[0.4, 0.3, 0.2, 0.1])
    pred = np.clip(target + rng.choice([-1, 0, 0, 1], size=150), 0, 3)
    if seed == 2:  # class 2 never occurs: macro-F1 leaves it out, QWK keeps the 0..3 scale
        target[target == 2], pred[pred == 2] = 1, 3
    target[rng.random(150) < 0.2] = MISSING
    keep = target != MISSING
    out = ordinal_metrics(torch.tensor(pred), torch.tensor(target))
    t, p = target[keep], pred[keep]
    assert out["n"] == keep.sum()
    assert out["accuracy"] == pytest.approx(accuracy_score(t, p), abs=1e-6)
    assert out["macro_f1"] == pytest.approx(f1_score(t, p, average="macro"), abs=1e-6)
    assert out["qwk"] == pytest.approx(cohen_kappa_score(t, p, weights="quadratic", labels=range(4)), abs=1e-6)
    # Class scores give the same answers through their argmax.
    scores = torch.nn.functional.one_hot(torch.tensor(pred), 4).float() * 0.7 + 0.1
    assert ordinal_metrics(scores, torch.tensor(target)) == out


def _survival_data(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    time = rng.integers(1, 25, size=n).astype(float)  # many tied times
    event = (rng.random(n) > 0.4).astype(float)  # ~40 % censored
    risk = np.round(rng.normal(size=n) - 0.05 * time, 1)  # informative, with tied predictions
    return risk, time, event


@pytest.mark.parametrize("seed", range(5))
def test_concordance_matches_lifelines_exactly(seed):
    risk, time, event = _survival_data(np.random.default_rng(seed), 300)
    expected = lifelines_concordance_index(time, -risk, event)
    assert abs(concordance_index(torch.tensor(risk), torch.tensor(time), torch.tensor(event)) - expected) <= 1e-12
    assert 0.5 < expected < 1  # the data are informative, so a sign error would fail


def test_concordance_masks_nan_and_is_nan_without_comparable_pairs():
    risk, time, event = _survival_data(np.random.default_rng(9), 80)
    risk[3], time[10], event[20] = np.nan, np.nan, np.nan
    keep = ~(np.isnan(risk) | np.isnan(time) | np.isnan(event))
    expected = lifelines_concordance_index(time[keep], -risk[keep], event[keep])
    assert abs(concordance_index(risk, time, event) - expected) <= 1e-12
    assert np.isnan(concordance_index(risk, time, np.zeros_like(event)))


# --- calibration -----------------------------------------------------------------------------------


def test_class_calibration_error_matches_torchmetrics_module():
    generator = torch.Generator().manual_seed(6)
    probs = torch.softmax(2 * torch.randn(500, 4, generator=generator), dim=1)
    target = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    target[:60] = MISSING
    module = MulticlassCalibrationError(num_classes=4, n_bins=15, norm="l1")
    module.update(probs[60:], target[60:])
    assert class_calibration_error(probs, target) == pytest.approx(module.compute().item(), abs=1e-7)
    assert 0 < class_calibration_error(probs, target) < 0.2


def _ece_by_hand(probs: np.ndarray, target: np.ndarray, n_bins: int = 15) -> float:
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == target
    bins = np.digitize(confidence, np.linspace(0, 1, n_bins + 1)) - 1  # [b_i, b_i+1), as torch.bucketize
    return sum(
        (bins == b).mean() * abs(correct[bins == b].mean() - confidence[bins == b].mean()) for b in np.unique(bins)
    )


def test_voxel_calibration_error_equals_hand_ece_on_flattened_voxels():
    generator = torch.Generator().manual_seed(7)
    probs = torch.softmax(3 * torch.randn(2, 3, 5, 4, 3, generator=generator), dim=1)
    target = torch.randint(0, 3, (2, 5, 4, 3), generator=generator)
    flat_probs = probs.permute(0, 2, 3, 4, 1).reshape(-1, 3).numpy()
    expected = _ece_by_hand(flat_probs, target.reshape(-1).numpy())
    assert voxel_calibration_error(probs, target) == pytest.approx(expected, abs=1e-6)


def test_reliability_bins_of_separate_parts_add_up_to_torchmetrics_ece_of_all():
    generator = torch.Generator().manual_seed(9)
    probs = torch.softmax(3 * torch.randn(900, 3, generator=generator), dim=1)
    probs[:40] = torch.tensor([1.0, 0.0, 0.0])  # exactly-1 confidences: torchmetrics' bin of their own
    target = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    target[100:110] = MISSING
    parts = [reliability_bins(probs[i:i + 300], target[i:i + 300]) for i in (0, 300, 600)]
    summed = sum(parts)
    assert summed.shape == (3, 16)
    assert summed[BIN_COUNT].sum() == 890 and summed[BIN_COUNT, -1] == 40
    assert bins_calibration_error(summed) == pytest.approx(class_calibration_error(probs, target), abs=1e-6)
    confidence = probs.max(1).values[target != MISSING].double()
    assert summed[BIN_CONFIDENCE].sum() == pytest.approx(float(confidence.sum()), rel=1e-12)
    assert np.isnan(bins_calibration_error(np.zeros((3, 16))))


def test_the_review_flags_recall_of_the_worst_decile_and_spearman_of_uncertainty_against_error():
    rng = np.random.default_rng(10)
    dice = rng.uniform(0.5, 0.95, 30)
    entropy = 0.5 - 0.4 * dice + rng.normal(0, 0.05, 30)
    flagged = np.zeros(30, bool)
    worst = np.argsort(dice)[:3]
    flagged[worst[:2]] = True  # two of the three worst
    flagged[np.argsort(dice)[-1]] = True  # and the best case
    rows = [{"has_label": True, "dice/a": d, "dice/b": d, "entropy/a": e, "entropy/b": math.nan,
             "needs_review": f} for d, e, f in zip(dice, entropy, flagged)]
    rows.append({"has_label": False, "entropy/a": 0.1, "entropy/b": 0.1, "needs_review": True})  # unlabelled
    metrics = uncertainty_and_review(rows, {1: "a", 2: "b"})
    rho, p = stats.spearmanr(entropy, 1 - dice)
    assert metrics["uncertainty_error_spearman"] == pytest.approx(rho, abs=1e-12) and rho > 0.5
    assert metrics["uncertainty_error_p"] == pytest.approx(p, rel=1e-9)
    assert metrics["uncertainty_error_cases"] == 30
    assert metrics["review_fraction"] == pytest.approx(4 / 31)
    assert metrics["worst_decile_cases"] == 3 and metrics["review_recall_worst_decile"] == pytest.approx(2 / 3)


def test_risk_tertiles_log_rank_matches_lifelines_and_ties_merge_groups():
    from lifelines.statistics import multivariate_logrank_test

    rng = np.random.default_rng(11)
    risk = rng.normal(size=60)
    time = rng.exponential(np.exp(-risk))
    event = (rng.uniform(size=60) < 0.8).astype(float)
    risk[5] = math.nan
    groups = risk_groups(risk, time, event)
    keep = ~np.isnan(risk)
    assert groups.n == 59 and groups.group[5] == -1 and np.bincount(groups.group[keep]).tolist() == [20, 19, 20]
    ranks = stats.rankdata(risk[keep], method="ordinal")  # tertiles by rank: 20, 19, 20 of 59
    assert (groups.group[keep] == np.digitize(ranks, [20.5, 39.5])).all()
    expected = multivariate_logrank_test(time[keep], groups.group[keep], event[keep])
    assert groups.p == pytest.approx(expected.p_value, rel=1e-12) and groups.p < 0.05
    tied = risk_groups(np.r_[np.zeros(10), np.ones(5)], np.arange(1.0, 16.0), np.ones(15))
    assert set(tied.group) == {0, 1}  # ten tied risks fill the first two tertiles: one group
    assert math.isnan(risk_groups(risk, time, np.zeros(60)).p)  # no event: nothing to test


def test_voxel_subsample_keeps_voxel_label_pairs():
    generator = torch.Generator().manual_seed(8)
    probs = torch.softmax(torch.randn(1, 3, 6, 6, 6, generator=generator), dim=1)
    target = torch.randint(0, 3, (1, 6, 6, 6), generator=generator)
    all_probs, all_target = flatten_voxels(probs, target)
    some_probs, some_target = flatten_voxels(probs, target, max_voxels=50, generator=generator)
    assert some_probs.shape == (50, 3) and some_target.shape == (50,)
    match = (some_probs[:, None] == all_probs[None]).all(-1)  # (50, 216): where each sample came from
    assert torch.equal(match.sum(1), torch.ones(50, dtype=torch.long))
    assert torch.equal(all_target[match.float().argmax(1)], some_target)


def test_interval_coverage_by_hand():
    samples = torch.arange(101, dtype=torch.float64)[:, None].expand(101, 5)  # quantiles are exact
    out = interval_coverage(samples, torch.tensor([4.0, 5.0, 50.0, 95.0, float("nan")]), level=0.9)
    assert out.n == 4 and out.coverage == 0.75 and out.mean_width == 90.0


def test_interval_coverage_is_nominal_for_a_calibrated_normal():
    generator = torch.Generator().manual_seed(10)
    samples = torch.randn(400, 20000, generator=generator)
    target = torch.randn(20000, generator=generator)
    out = interval_coverage(samples, target, level=0.9)
    assert abs(out.coverage - 0.9) < 0.02
    assert out.mean_width == pytest.approx(2 * 1.6449, abs=0.03)


# --- cohort summaries and validation ---------------------------------------------------------------


def _targets(**given: float) -> dict[str, float]:
    return {name: given.get(name, float("nan")) for name in ("mmse", "cdr", "time", "event")}


def test_validation_counts_misses_and_keeps_their_worst_case_in_the_mean():
    records = [
        {"subject_id": "a", "has_label": True, "dice/x": 0.8, "hd95/x": 2.0, "missed/x": 0.0} | _targets(),
        {"subject_id": "b", "has_label": True, "dice/x": 0.0, "hd95/x": 50.0, "missed/x": 1.0} | _targets(),
        {"subject_id": "c", "has_label": True, "dice/x": 1.0, "hd95/x": float("nan"), "missed/x": 0.0} | _targets(),
        {"subject_id": "d", "has_label": False} | _targets(),  # unlabelled: no segmentation keys
    ]
    metrics = validation_metrics(records, {1: "x"}, 4)
    assert metrics["val/cases"] == 4
    assert metrics["val/missed/x"] == 1 and metrics["val/missed"] == 1
    assert metrics["val/hd95/x"] == 26.0  # the miss counts at its worst case; both-empty "c" is left out
    assert metrics["val/dice/x"] == pytest.approx(0.6)


def test_validation_keys_are_every_key_validation_can_report():
    """A search compares trials by key: validation_keys must name exactly what a full validation reports, and a
    validation without events or targets reports a subset (the loop fills the rest with NaN)."""
    full = [{"subject_id": str(i), "has_label": True, "dice/x": 0.5, "hd95/x": 1.0, "missed/x": 0.0, "pred_mmse": 25.0 + i,
             "pred_cdr": i % 4, "pred_risk": float(i)} | _targets(mmse=20.0 + 2 * i, cdr=0.5, time=float(5 - i), event=1.0)
            for i in range(5)]
    keys = validation_keys({1: "x"}, segmentation=True, heads=["mmse", "cdr", "risk"])
    assert sorted(validation_metrics(full, {1: "x"}, 4)) == sorted(keys)
    censored = [r | {"event": 0.0, "mmse": float("nan")} for r in full]
    assert set(validation_metrics(censored, {1: "x"}, 4)) < set(keys)
    assert validation_keys({1: "x"}, segmentation=False, heads=["risk"]) == ["val/cases", "val/c_index"]


def test_validation_outcome_scores_match_scipy_and_sklearn():
    rng = np.random.default_rng(11)
    stages = np.array([0.0, 0.5, 1.0, 2.0])
    mmse = rng.normal(25, 3, size=40)
    pred_mmse = mmse + rng.normal(0, 2, size=40)
    cdr = stages[rng.integers(0, 4, size=40)]
    pred_cdr = np.clip(cdr_to_class(torch.tensor(cdr)).numpy() + rng.choice([-1, 0, 0, 1], size=40), 0, 3)
    mmse[:5], cdr[5:9] = np.nan, np.nan
    records = [{"subject_id": str(i), "has_label": False, "pred_mmse": float(pred_mmse[i]), "pred_cdr": int(pred_cdr[i])}
               | _targets(mmse=float(mmse[i]), cdr=float(cdr[i])) for i in range(40)]
    metrics = validation_metrics(records, {1: "x"}, 4)
    keep = ~np.isnan(mmse)
    assert metrics["val/mmse_pearson"] == pytest.approx(stats.pearsonr(pred_mmse[keep], mmse[keep]).statistic, rel=1e-6)
    present = ~np.isnan(cdr)
    target = cdr_to_class(torch.tensor(cdr[present])).numpy()
    assert metrics["val/cdr_macro_f1"] == pytest.approx(f1_score(target, pred_cdr[present], average="macro"), abs=1e-6)
    assert metrics["val/cdr_qwk"] == pytest.approx(
        cohen_kappa_score(target, pred_cdr[present], weights="quadratic", labels=range(4)), abs=1e-6)


def test_volume_agreement_over_labelled_rows_matches_hand_formulas():
    rng = np.random.default_rng(12)
    reference = rng.normal(3000, 400, size=12)
    predicted = reference + rng.normal(80, 150, size=12)
    rows = [{"volume/x": float(p), "volume_ref/x": float(r)} for p, r in zip(predicted, reference)]
    rows.insert(0, {"volume/x": 2500.0})  # unlabelled rows, first and later, have no reference volume
    rows.append({"volume/x": 2600.0})
    out = volume_agreement(rows, {1: "x"})
    diff = predicted - reference
    sd = np.sqrt(np.sum((diff - diff.mean()) ** 2) / 11)
    assert out["volume_pairs/x"] == 12
    assert out["volume_icc/x"] == pytest.approx(_icc_by_anova_loops(np.stack([predicted, reference], 1)), rel=1e-12)
    assert out["volume_bias_mm3/x"] == pytest.approx(diff.mean(), rel=1e-12)
    assert out["volume_loa_lower_mm3/x"] == pytest.approx(diff.mean() - 1.96 * sd, rel=1e-12)
    assert out["volume_loa_upper_mm3/x"] == pytest.approx(diff.mean() + 1.96 * sd, rel=1e-12)
    assert out["volume_abs_error_mm3/x"] == pytest.approx(np.abs(diff).mean(), rel=1e-12)
    assert out["volume_rel_error/x"] == pytest.approx(np.mean(np.abs(diff) / reference), rel=1e-12)


class _FixedSegmentation(torch.nn.Module):
    """A stand-in model whose segmentation is a given label map (one-hot logits), whatever the input."""

    def __init__(self, label_map: torch.Tensor, classes: int):
        super().__init__()
        self.logits = torch.nn.functional.one_hot(label_map, classes).movedim(-1, 1).float()

    def forward(self, image, clinical, cross, voxel_volume) -> JointOutput:
        return JointOutput(seg=[self.logits])


def _oblique_affine(spacing: tuple[float, float, float], degrees: float) -> np.ndarray:
    """A 4 × 4 affine whose axes are rotated about z and scaled by ``spacing`` (column norms = spacing)."""
    a = np.deg2rad(degrees)
    rotation = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(spacing)
    affine[:3, 3] = (-20.0, 5.0, 3.0)
    return affine


def _cube_batch(affines: list[np.ndarray], shifts: list[int]) -> tuple[dict[str, np.ndarray], torch.Tensor]:
    """A shard-like batch of 6³ reference cubes and the prediction: each cube shifted along axis 2."""
    size, shape = len(affines), (16, 16, 16)
    label = np.zeros((size, *shape), np.int64)
    pred = np.zeros_like(label)
    for b, k in enumerate(shifts):
        label[b, 5:11, 5:11, 3:9] = 1
        pred[b, 5:11, 5:11, 3 + k : 9 + k] = 1
    batch = {
        "subject_id": np.array([f"s{b}" for b in range(size)]), "image": np.zeros((size, 1, *shape), np.float32),
        "label": label, "has_label": np.ones(size, bool), "affine": np.stack([a.reshape(-1) for a in affines]),
        **{name: np.full(size, np.nan) for name in ("mmse", "cdr", "time", "event")},
    }
    return batch, torch.from_numpy(pred)


def test_model_batch_spacing_is_the_affines_column_norms():
    affines = [_oblique_affine((0.8, 1.0, 2.5), 30.0), _oblique_affine((1.2, 0.7, 3.0), -65.0)]
    batch, _ = _cube_batch(affines, [1, 1])
    model_batch = to_model_batch(batch, ClinicalSchema(), "cpu")
    torch.testing.assert_close(model_batch.spacing, torch.tensor([[0.8, 1.0, 2.5], [1.2, 0.7, 3.0]], dtype=torch.float64))
    torch.testing.assert_close(model_batch.voxel_volume, torch.tensor([2.0, 2.52]))


@pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")  # MONAI-internal deprecation
def test_validation_distances_are_in_each_cases_own_millimetres():
    """As in test_cubes_offset_along_thick_axis, a shift of k voxels along axis 2 gives HD95 = k · spacing_2 mm;
    the spacing comes from each case's affine, so two cases of a batch get their own."""
    affines = [_oblique_affine((0.8, 1.0, 2.5), 30.0), _oblique_affine((1.2, 0.7, 3.0), -65.0)]
    batch, pred = _cube_batch(affines, [2, 1])
    model_batch = to_model_batch(batch, ClinicalSchema(), "cpu")
    records = predict_cases(_FixedSegmentation(pred, 2), [model_batch], 1.0, {1: "cube"}, contextlib.nullcontext)
    assert [r["hd95/cube"] for r in records] == pytest.approx([2 * 2.5, 1 * 3.0], abs=1e-6)
    assert [r["dice/cube"] for r in records] == pytest.approx([4 / 6, 5 / 6])
    assert [r["missed/cube"] for r in records] == [0.0, 0.0]
