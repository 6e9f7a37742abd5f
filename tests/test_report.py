"""The evaluation report, built from real ``evaluate`` outputs of a synthetic joint model and a real MSD model,
checked number by number against ``summary.json`` and reference statistics, and opened in headless Chromium."""

from __future__ import annotations

import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import MSD_TRAIN_CASES, REPO, msd_subset, shared_data
from lifelines.statistics import multivariate_logrank_test
from matplotlib.image import imread
from scipy import stats
from typer.testing import CliRunner

from jointray.cli import app
from jointray.inference.evaluate import evaluate
from jointray.report.evaluation import build_report

ARTIFACTS = REPO / "runs" / "test-artifacts"


@pytest.fixture(scope="module")
def synthetic_evaluation(one_epoch, train_cohort, tmp_path_factory) -> Path:
    """The one-epoch joint model (segmentation and all three outcome heads) over the 20 synthetic subjects, 8 MC
    samples of the heads per case."""
    _, result = one_epoch
    root, _ = train_cohort
    out = tmp_path_factory.mktemp("report_synthetic") / "v2"
    evaluate(result.best_dir, root / "cohort" / "manifest.csv", out, mc_samples=8, mc_mode="heads")
    return out


@pytest.fixture(scope="module")
def msd_evaluations(msd_checkpoint, tmp_path_factory) -> tuple[Path, Path]:
    """The MSD model over 8 held-out real cases, with test-time mirroring and 4 MC samples of the whole network,
    and without either."""
    folder = tmp_path_factory.mktemp("report_msd")
    cases, _ = msd_subset(shared_data("msd_hippocampus"), folder / "cases", MSD_TRAIN_CASES, 8)
    evaluate(msd_checkpoint, cases, folder / "mirrored", mc_samples=4, mc_mode="full")
    evaluate(msd_checkpoint, cases, folder / "single_pass", tta=False)
    return folder / "mirrored", folder / "single_pass"


class _Page(HTMLParser):
    """The page's keyed numbers (``data-metric`` cells), its images and its section ids."""

    def __init__(self):
        super().__init__()
        self.numbers: dict[str, str] = {}
        self.images: list[dict[str, str]] = []
        self.sections: list[str] = []
        self._key: str | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "td" and "data-metric" in attrs:
            self._key = attrs["data-metric"]
            self.numbers[self._key] = ""
        elif tag == "img":
            self.images.append(attrs)
        elif tag == "section":
            self.sections.append(attrs["id"])

    def handle_data(self, data):
        if self._key is not None:
            self.numbers[self._key] += data

    def handle_endtag(self, tag):
        if tag == "td":
            self._key = None


def _read_page(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text())
    return page


def _assert_numbers_are_the_summarys(page: _Page, evaluation: Path) -> None:
    """Every keyed number on the page is summary.json's, written to the decimals shown."""
    metrics = json.loads((evaluation / "summary.json").read_text())["metrics"]
    summary_keys = [k for k in page.numbers if not k.startswith("compare/")]
    assert len(summary_keys) >= 10
    for key in summary_keys:
        text, value = page.numbers[key], metrics[key]
        if value is None:
            assert text == "n/a", key
            continue
        digits = len(text.split(".")[1]) if "." in text else 0
        assert text == f"{value:.{digits}f}", (key, text, value)


def _assert_figures_are_real_pngs(document) -> None:
    assert document.figures
    for figure in document.figures:
        assert figure.path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", figure.path
        height, width = imread(figure.path).shape[:2]
        assert (width, height) == (figure.width, figure.height), figure.path
        assert width == 720 and height in (300, 420)


def test_the_joint_models_report_has_every_section_with_summary_numbers_and_real_figures(synthetic_evaluation,
                                                                                         tmp_path):
    out = tmp_path / "synthetic.html"
    document = build_report([synthetic_evaluation], out)
    page = _read_page(out)
    assert page.sections == ["segmentation", "outcomes", "trust", "training"]
    _assert_numbers_are_the_summarys(page, synthetic_evaluation)
    _assert_figures_are_real_pngs(document)
    names = {f.path.name for f in document.figures}
    assert {"dice.png", "hd95.png", "mmse.png", "cdr.png", "kaplan-meier.png", "reliability-voxels.png",
            "reliability-cdr.png", "uncertainty-error.png", "losses-fold_0.png", "weights-fold_0.png"} <= names
    assert sum(n.startswith("case-") for n in names) == 5  # the worst cases' slices
    # every image is embedded: the page needs nothing beside it
    assert len(page.images) == len(document.figures)
    assert all(i["src"].startswith("data:image/png;base64,") for i in page.images)
    # the numbers file holds what the page shows
    shown = json.loads(out.with_suffix(".json").read_text())["numbers"]
    assert set(shown) == set(page.numbers)
    html = out.read_text()
    assert "research software" in html and "not a diagnosis" in html
    # worst cases link to their slices
    for anchor in re.findall(r'<a href="#(case-[^"]+)">', html):
        assert f'id="{anchor}"' in html


def test_report_statistics_agree_with_scipy_and_lifelines_on_the_same_cases(synthetic_evaluation):
    cases = pd.read_csv(synthetic_evaluation / "cases.csv")
    metrics = json.loads((synthetic_evaluation / "summary.json").read_text())["metrics"]
    structures = [c.removeprefix("volume_ref/") for c in cases.columns if c.startswith("volume_ref/")]
    assert structures
    for name in structures:  # Bland–Altman: mean difference ± 1.96 SD (n − 1)
        diff = (cases[f"volume/{name}"] - cases[f"volume_ref/{name}"]).to_numpy()
        assert metrics[f"volume_bias_mm3/{name}"] == pytest.approx(diff.mean(), rel=1e-12)
        half = 1.96 * diff.std(ddof=1)
        assert metrics[f"volume_loa_upper_mm3/{name}"] == pytest.approx(diff.mean() + half, rel=1e-3)
        assert metrics[f"volume_loa_lower_mm3/{name}"] == pytest.approx(diff.mean() - half, rel=1e-3)
    # log-rank over tertiles of the predicted risk, the groups cut here with numpy
    risk, time, event = (cases[c].to_numpy(float) for c in ("pred_risk", "time", "event"))
    cuts = np.quantile(risk, [1 / 3, 2 / 3])
    tertile = np.searchsorted(cuts, risk, side="left")
    assert len(np.unique(tertile)) == 3
    expected = multivariate_logrank_test(time, tertile, event)
    assert metrics["risk_logrank_p"] == pytest.approx(expected.p_value, rel=1e-9)
    assert metrics["risk_logrank_statistic"] == pytest.approx(expected.test_statistic, rel=1e-9)
    # uncertainty against error: mean structure entropy against 1 − mean Dice
    entropy = cases[[f"entropy/{n}" for n in structures]].mean(axis=1, skipna=True)
    error = 1 - cases[[f"dice/{n}" for n in structures]].mean(axis=1, skipna=True)
    keep = entropy.notna() & error.notna()
    rho, p = stats.spearmanr(entropy[keep], error[keep])
    assert metrics["uncertainty_error_spearman"] == pytest.approx(rho, abs=1e-12)
    assert metrics["uncertainty_error_p"] == pytest.approx(p, rel=1e-9)
    # the MC intervals' coverage of the true MMSE
    inside = (cases["pred_mmse_low"] <= cases["mmse"]) & (cases["mmse"] <= cases["pred_mmse_high"])
    assert metrics["mmse_interval_coverage"] == pytest.approx(inside.mean(), abs=1e-12)
    # the review flag: its share, and its recall of the worst tenth by mean Dice
    assert metrics["review_fraction"] == pytest.approx(cases["needs_review"].mean(), abs=1e-12)
    worst = (1 - error).sort_values(kind="stable").index[:math.ceil(len(cases) / 10)]
    assert metrics["review_recall_worst_decile"] == pytest.approx(cases.loc[worst, "needs_review"].mean(), abs=1e-12)


def test_an_msd_report_compares_two_evaluations_and_has_no_outcome_section(msd_evaluations, tmp_path):
    mirrored, single = msd_evaluations
    out = tmp_path / "msd.html"
    result = CliRunner().invoke(app, ["report", "--evaluation", str(mirrored), "--evaluation", str(single),
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    page = _read_page(out)
    assert page.sections == ["segmentation", "trust", "training", "comparison"]
    _assert_numbers_are_the_summarys(page, mirrored)
    assert "pred_mmse" not in out.read_text()
    figures = json.loads(out.with_suffix(".json").read_text())["figures"]
    assert {Path(f["path"]).name for f in figures} >= {"dice.png", "reliability-voxels.png", "uncertainty-error.png"}
    # the paired test, against scipy on the two cases.csv
    a, b = (pd.read_csv(f / "cases.csv").set_index("subject_id")["dice/anterior"] for f in (mirrored, single))
    diff = (b - a.loc[b.index]).to_numpy()
    shown = json.loads(out.with_suffix(".json").read_text())["numbers"]
    assert shown["compare/single_pass/dice/anterior/difference"] == pytest.approx(diff.mean(), abs=1e-12)
    expected_p = stats.wilcoxon(diff).pvalue if np.any(diff != 0) else 1.0
    assert shown["compare/single_pass/dice/anterior/p"] == pytest.approx(expected_p, rel=1e-9)


def test_report_refuses_a_folder_that_is_not_an_evaluation(tmp_path):
    result = CliRunner().invoke(app, ["report", "--evaluation", str(tmp_path)])
    assert result.exit_code == 2
    assert f"{tmp_path} is not an evaluate output: summary.json, cases.csv missing" in " ".join(result.output.split())


def test_both_reports_open_in_headless_chromium_with_every_image_drawn(synthetic_evaluation, msd_evaluations,
                                                                       tmp_path, chromium):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for name, folders in (("report_synthetic", [synthetic_evaluation]), ("report_msd", list(msd_evaluations))):
        out = tmp_path / f"{name}.html"
        build_report(folders, out)
        chromium.get(out.as_uri())
        broken = chromium.execute_script(
            "return [...document.images].filter(i => !i.complete || i.naturalWidth === 0).map(i => i.alt);")
        assert broken == [], broken
        drawn = chromium.execute_script("return document.images.length;")
        assert drawn >= 5
        height = chromium.execute_script("return document.documentElement.scrollHeight;")
        chromium.set_window_size(1400, min(height, 16000))  # the whole page in one screenshot
        assert chromium.save_screenshot(str(ARTIFACTS / f"{name}.png"))
        assert imread(ARTIFACTS / f"{name}.png").shape[0] > 1000


def test_a_joint_models_patient_report_says_what_each_outcome_means(one_epoch, train_cohort, tmp_path):
    from jointray.inference.client import predict_local

    _, result = one_epoch
    root, _ = train_cohort
    row = pd.read_csv(root / "cohort" / "manifest.csv").iloc[0]
    image = root / "cohort" / row["image"]
    ((_, body),) = predict_local(result.best_dir, [image], {"age": float(row["age"]), "sex": str(row["sex"])},
                                 tmp_path, 8, "heads", report=True)
    html = Path(body["report_file"]).read_text()
    assert re.findall(r'<section id="([^"]+)"', html) == ["review", "segmentation", "outcomes", "explanations",
                                                          "model"]
    assert html.count("<figcaption>HiResCAM of ") == 5 and "Integrated Gradients" in html  # 2 structures, 3 heads
    stage = f"{body['outcomes']['cdr']['stage']:g}"
    meaning = {"0": "no dementia", "0.5": "questionable or very mild dementia", "1": "mild dementia",
               "2": "moderate dementia"}[stage]
    assert f"<td>{stage}</td>" in html and meaning in html
    low, high = body["outcomes"]["mmse"]["interval"]
    assert f"{low:.1f} – {high:.1f}" in html and "MMSE (0–30)" in html
    assert "Cox log hazard" in html and ("Needs review by a person" in html) == body["needs_review"]
