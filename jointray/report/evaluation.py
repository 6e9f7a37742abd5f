"""The evaluation report: one or more ``evaluate`` outputs as the results section of a paper.

:func:`build_report` reads each output folder (``summary.json``, ``cases.csv``, the masks) and the
training history of the model it names, and writes one HTML page with its figures. Each section is
there only where the data has what it needs: a segmentation-only model has no outcome section, an
evaluation without labels no Dice, one run without ``--mc-samples`` no interval coverage.

* **Segmentation**: Dice and HD95 per structure (a box and every case), the worst cases named and
  linked to three slices of each; volume agreement (predicted against reference, Bland–Altman, ICC).
* **Outcomes**: MMSE predicted against true with the MC intervals and their coverage; the CDR
  confusion matrix and QWK; Kaplan–Meier curves by predicted-risk tertile, the log-rank test and C.
* **Trust**: reliability diagrams and ECE for voxels and CDR stages; per-case uncertainty against
  error (Spearman ρ) and what the review flag catches.
* **Training**: learning curves per task and the task weights per epoch (``history.jsonl``).
* **Comparison**: with several evaluations of the same cases, every per-case metric side by side
  with paired differences and a Wilcoxon test (:mod:`jointray.report.comparison`), and the cohort
  metrics side by side.

The numbers in the page are those of ``summary.json`` (the computations live in
:mod:`jointray.metrics`, which ``evaluate`` already ran); the report adds only what is per figure.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import torch

from jointray.artifacts import ENSEMBLE_FILE
from jointray.data.volumes import read_volume
from jointray.inference.evaluate import CASES_FILE, SUMMARY_FILE
from jointray.losses.ordinal import CDR_STAGES, cdr_to_class
from jointray.metrics.risk_groups import risk_groups
from jointray.metrics.trust import CDR_PREFIX, case_dice, case_uncertainty, cdr_reliability
from jointray.metrics.volume import bland_altman
from jointray.report import figures as plots
from jointray.report.comparison import compare
from jointray.report.document import Cell, Document, Section, number, render
from jointray.train.tracking import HISTORY_FILE, read_history
from jointray.trust.risk_control import risk_coverage

#: Worst cases (by mean Dice) named and shown as slices.
WORST_CASES = 5
#: Large enough for any MSD crop or whole-head scan the models were trained on; a report only displays.
DISPLAY_MAX_VOXELS = 512**3
TERTILES = ("low risk", "middle", "high risk")


@dataclass
class Evaluation:
    """One ``evaluate`` output folder, read."""

    name: str
    folder: Path
    summary: dict[str, Any]
    cases: pd.DataFrame
    structures: list[str]

    @property
    def metrics(self) -> dict[str, float]:
        return {k: (math.nan if v is None else float(v)) for k, v in self.summary["metrics"].items()}

    def rows(self) -> list[dict[str, Any]]:
        return self.cases.to_dict("records")

    def histories(self) -> list[tuple[str, list[dict[str, float]]]]:
        """(label, epochs) of every training run behind the evaluated model(s) that left a history."""
        found = []
        for source in (Path(s.strip()) for s in self.summary["checkpoint"].split(",")):
            if (source / ENSEMBLE_FILE).exists():
                runs = sorted(source.glob(f"fold_*/{HISTORY_FILE}"))
            else:
                runs = [source.parent / HISTORY_FILE]
            found += [(path.parent.name, read_history(path)) for path in runs if path.exists()]
        return found


def load_evaluation(folder: str | Path, name: str | None = None) -> Evaluation:
    """Read an ``evaluate`` output folder; a folder without ``summary.json`` and ``cases.csv`` is an error
    that names it."""
    folder = Path(folder)
    missing = [f for f in (SUMMARY_FILE, CASES_FILE) if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} is not an evaluate output: {', '.join(missing)} missing "
                                f"(run `jointray evaluate --out {folder}` first)")
    summary = json.loads((folder / SUMMARY_FILE).read_text())
    try:
        cases = pd.read_csv(folder / CASES_FILE)
    except pd.errors.EmptyDataError:
        cases = pd.DataFrame({"subject_id": []})
    structures = [c.removeprefix("volume/") for c in cases.columns if re.fullmatch(r"volume/[^/]+", c)]
    return Evaluation(name=name or folder.name, folder=folder, summary=summary, cases=cases, structures=structures)


def _slug(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_-]+", "-", text).strip("-").lower()


class ReportBuilder:
    """Builds the :class:`Document` of :func:`build_report`, section by section."""

    def __init__(self, evaluations: list[Evaluation], figures_dir: Path):
        self.evaluations = evaluations
        self.main = evaluations[0]
        self.figures_dir = figures_dir
        self.doc = Document(title=f"jointray evaluation: {self.main.name}")

    def shown(self, key: str, digits: int = 4) -> Cell:
        """A cell showing the main evaluation's ``summary.json`` metric ``key``."""
        return self.doc.value(key, self.main.metrics.get(key), digits)

    def save(self, figure, name: str, caption: str):
        return plots.save(figure, self.figures_dir / f"{_slug(name)}.png", caption)

    # -- sections ----------------------------------------------------------------------------------------
    def overview(self) -> None:
        e, s = self.main, self.main.summary
        self.doc.meta = [
            f"model: {s['checkpoint']}", f"data: {s['data']}",
            f"{s['predicted']} of {s['inputs']} inputs predicted, {len(s['quarantined'])} quarantined; "
            f"test-time mirroring {'on' if s.get('tta') else 'off'}; Monte Carlo samples per case: "
            f"{s.get('mc_samples', 1)} ({s.get('mc_mode', 'heads')})",
            f"report written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC from {e.folder}",
        ]
        if s["quarantined"]:
            section = self._section("quarantine", "Inputs not predicted")
            section.table(["input", "stage", "reason"], [
                [Cell(q[k], text_cell=True) for k in ("path", "stage", "reason")] for q in s["quarantined"]])

    def segmentation(self) -> None:
        e = self.main
        names = e.structures
        if not names or f"dice/{names[0]}" not in e.cases.columns:
            return
        section = self._section("segmentation", "Segmentation")
        labelled = e.cases[e.cases["has_label"].astype(bool)].reset_index(drop=True)
        section.table(["structure", "mean Dice", "mean HD95 (mm)", "missed", "cases"], [
            [Cell(n, text_cell=True), self.shown(f"dice/{n}"),
             self.shown(f"hd95/{n}", 2), self.shown(f"missed/{n}", 0),
             Cell(str(int(labelled[f"dice/{n}"].notna().sum())))] for n in names
        ] + [[Cell("mean", text_cell=True), self.shown("dice"), Cell(""),
              self.shown("missed", 0), Cell(str(len(labelled)))]],
            caption="HD95: 95th-percentile Hausdorff distance; a missed structure scores the image diagonal.")
        mean_dice = np.array([case_dice(r, names) for r in labelled.to_dict("records")])
        worst = np.argsort(mean_dice, kind="stable")[:WORST_CASES]
        highlight = {n: worst.tolist() for n in names}
        caption = (f"Dice per structure, one point per case ({len(labelled)} cases); the {len(worst)} worst cases "
                   "by mean Dice in red.")
        section.figure(self.save(plots.strips({n: labelled[f"dice/{n}"] for n in names}, "Dice", highlight),
                                 "dice", caption))
        section.figure(self.save(plots.strips({n: labelled[f"hd95/{n}"] for n in names}, "HD95 (mm)", highlight),
                                 "hd95", "HD95 per structure, one point per case; the worst by mean Dice in red."))
        section.heading("Worst cases", "worst-cases")
        section.table(["case", "mean Dice", *[f"Dice {n}" for n in names], *[f"HD95 {n} (mm)" for n in names]], [
            [Cell(str(labelled.at[i, "subject_id"]), link=f"case-{_slug(str(labelled.at[i, 'subject_id']))}",
                  text_cell=True), Cell(number(mean_dice[i]))]
            + [Cell(number(labelled.at[i, f"dice/{n}"])) for n in names]
            + [Cell(number(labelled.at[i, f"hd95/{n}"], 2)) for n in names] for i in worst])
        self._volume_agreement(section, labelled)
        section.heading("Slices of the worst cases")
        for i in worst:
            shown = self._case_slices(labelled.iloc[i].to_dict(), float(mean_dice[i]))
            if shown is not None:
                section.figure(shown, anchor=f"case-{_slug(str(labelled.at[i, 'subject_id']))}")

    def _volume_agreement(self, section: Section, labelled: pd.DataFrame) -> None:
        names = self.main.structures
        if f"volume_ref/{names[0]}" not in labelled.columns:
            return
        section.heading("Volume agreement")
        section.table(["structure", "ICC(2,1)", "bias (mm³)", "lower limit (mm³)", "upper limit (mm³)",
                       "mean |error| (mm³)", "mean relative error"], [
            [Cell(n, text_cell=True), self.shown(f"volume_icc/{n}"),
             self.shown(f"volume_bias_mm3/{n}", 1),
             self.shown(f"volume_loa_lower_mm3/{n}", 1),
             self.shown(f"volume_loa_upper_mm3/{n}", 1),
             self.shown(f"volume_abs_error_mm3/{n}", 1),
             self.shown(f"volume_rel_error/{n}")] for n in names],
            caption="Bland–Altman bias and 95 % limits of agreement of predicted − reference volume.")
        for n in names:
            pred, ref = labelled[f"volume/{n}"].to_numpy(float), labelled[f"volume_ref/{n}"].to_numpy(float)
            section.figure(self.save(plots.agreement(pred, ref, bland_altman(pred, ref), n), f"volume-{n}",
                                     f"{n}: predicted against reference volume, and the Bland–Altman plot."))

    def _case_slices(self, row: dict[str, Any], mean_dice: float):
        """Three slices through the reference's centre of mass (the prediction's where the reference is
        empty), in the closest RAS orientation; None where the files are gone."""
        if not isinstance(row.get("mask"), str) or not Path(row["mask"]).exists():
            return None
        image = read_volume(row["image"], DISPLAY_MAX_VOXELS)
        array = image.array if image.array.ndim == 3 else image.array[..., 0]
        mask = plots.to_ras(np.asarray(nib.load(row["mask"]).dataobj), image.affine)
        label = row.get("label")
        reference = plots.to_ras(np.asarray(nib.load(label).dataobj), image.affine) \
            if isinstance(label, str) and Path(label).exists() else None
        centre = plots.centre_of(reference, mask)
        name = str(row["subject_id"])
        figure = plots.slices(plots.to_ras(array.astype(np.float32), image.affine), mask, reference, centre,
                              f"{name}: mean Dice {number(mean_dice, 3)} (prediction filled, reference outlined)")
        return self.save(figure, f"case-{name}", f"{name}: prediction in colour, reference outline in white.")

    def outcomes(self) -> None:
        e = self.main
        cases = e.cases
        has = {h: f"pred_{h}" in cases.columns for h in ("mmse", "cdr", "risk")}
        if not any(has.values()):
            return
        section = self._section("outcomes", "Clinical outcomes")
        level = self.main.summary.get("interval", 0.9)
        if has["mmse"]:
            section.heading("MMSE (regression)")
            known = cases[cases["mmse"].notna()]
            section.table(["MAE", "RMSE", "R²", "Pearson r", f"{level:.0%} interval coverage",
                           "mean interval width", "cases"], [[
                self.shown("mmse_mae", 2), self.shown("mmse_rmse", 2),
                self.shown("mmse_r2", 3), self.shown("mmse_pearson", 3),
                self.shown("mmse_interval_coverage", 3),
                self.shown("mmse_interval_width", 2), Cell(str(len(known)))]])
            if "pred_mmse_low" not in cases.columns:
                section.note("No intervals: evaluate ran one pass per case (use --mc-samples for intervals).")
            if len(known):
                low = known["pred_mmse_low"].to_numpy(float) if "pred_mmse_low" in known else None
                high = known["pred_mmse_high"].to_numpy(float) if "pred_mmse_high" in known else None
                figure = plots.predicted_against_true(known["mmse"].to_numpy(float), known["pred_mmse"].to_numpy(float),
                                                      low, high, "MMSE")
                interval = f", with the {level:.0%} Monte Carlo interval." if low is not None else "."
                section.figure(self.save(figure, "mmse", f"MMSE predicted against true ({len(known)} cases){interval}"))
        if has["cdr"]:
            section.heading("CDR stage (ordinal)")
            section.table(["accuracy", "macro F1", "quadratic weighted κ"], [[
                self.shown("cdr_accuracy", 3),
                self.shown("cdr_macro_f1", 3),
                self.shown("cdr_qwk", 3)]])
            known = cases[cases["cdr"].notna()]
            k = len([c for c in cases.columns if c.startswith(CDR_PREFIX)]) or 4
            if len(known):
                true = cdr_to_class(torch.tensor(known["cdr"].to_numpy(float)), k).numpy()
                pred = known["pred_cdr"].to_numpy(int)
                matrix = np.zeros((k, k), dtype=int)
                np.add.at(matrix, (true, pred), 1)
                labels = [f"{CDR_STAGES[i]:g}" + ("+" if i == k - 1 and k < len(CDR_STAGES) else "") for i in range(k)]
                section.figure(self.save(plots.confusion(matrix, labels, "CDR stage"), "cdr",
                                         f"CDR confusion matrix ({len(known)} cases): rows true, columns predicted."))
        if has["risk"]:
            section.heading("Time to event (Cox risk)")
            section.table(["Harrell's C", "log-rank χ² (tertiles)", "log-rank p"], [[
                self.shown("c_index", 3),
                self.shown("risk_logrank_statistic", 2),
                self.shown("risk_logrank_p", 4)]])
            columns = [cases[c].to_numpy(float) for c in ("pred_risk", "time", "event")]
            groups = risk_groups(*columns)
            if groups.n and not math.isnan(groups.p):
                section.figure(self.save(plots.kaplan_meier(columns[1], columns[2], groups.group, TERTILES,
                                                            "by tertile of predicted risk"), "kaplan-meier",
                                         f"Kaplan–Meier curves by tertile of predicted risk ({groups.n} cases), "
                                         f"log-rank p = {number(groups.p, 4)}."))

    def trust(self) -> None:
        e, s = self.main, self.main.summary
        names = e.structures
        rows = e.rows()
        voxel = {region: np.asarray(b) for region, b in s.get("reliability", {}).items()}
        cdr = cdr_reliability(rows, len([c for c in e.cases.columns if c.startswith(CDR_PREFIX)]) or 4)
        flag = "needs_review" in e.cases.columns
        if not voxel and cdr is None and not flag:
            return
        section = self._section("trust", "Does the uncertainty mean something?")
        if voxel:
            section.heading("Voxel calibration")
            section.table(["voxels", "ECE"], [[Cell(r, text_cell=True), self.shown(f"voxel_ece/{r}")] for r in voxel],
                          caption="Top-label expected calibration error over every voxel of every labelled case "
                                  "(all), and over the voxels the prediction or the reference calls a structure "
                                  "(foreground), where the errors are, and over those the prediction calls a structure "
                                  "(predicted). The foreground is chosen with the reference's help, so even "
                                  "perfectly calibrated probabilities score above 0 there; the predicted region "
                                  "has no such floor.")
            section.figure(self.save(plots.reliability(voxel, "voxels"), "reliability-voxels",
                                     "Reliability diagram of the voxel probabilities (marker area ∝ voxels in bin)."))
            compared = {e.name: np.asarray(e.summary["reliability"]["foreground"]) for e in self.evaluations
                        if "foreground" in e.summary.get("reliability", {})}
            if len(compared) > 1:  # e.g. a model and its calibrated self (jointray calibrate) on the same cases
                section.figure(self.save(plots.reliability(compared, "foreground voxels, each evaluation"),
                                         "reliability-compared", "Reliability of the foreground voxels of each "
                                         "evaluation: before and after calibration when one is the other calibrated."))
        if cdr is not None:
            section.heading("CDR calibration")
            section.table(["ECE"], [[self.shown("cdr_ece")]])
            section.figure(self.save(plots.reliability({"CDR stage": cdr}, "CDR stages"), "reliability-cdr",
                                     "Reliability diagram of the predicted CDR stage probabilities."))
        if names and f"dice/{names[0]}" in e.cases.columns:
            section.heading("Uncertainty against error")
            section.table(["Spearman ρ", "p", "cases", "flagged for review", "recall of the worst-Dice decile",
                           "worst-decile cases"], [[
                self.shown("uncertainty_error_spearman", 3),
                self.shown("uncertainty_error_p", 4),
                self.shown("uncertainty_error_cases", 0),
                self.shown("review_fraction", 3),
                self.shown("review_recall_worst_decile", 3),
                self.shown("worst_decile_cases", 0)]],
                caption="Per case: mean predictive entropy inside the predicted structures against 1 − mean Dice. "
                        "A positive ρ: the more uncertain cases are the worse ones.")
            self._quality(section, rows, names)
            labelled = [r for r in rows if r.get("has_label")]
            u = np.array([case_uncertainty(r, names) for r in labelled])
            err = 1 - np.array([case_dice(r, names) for r in labelled])
            flagged = np.array([bool(r.get("needs_review")) for r in labelled]) if flag else None
            keep = np.isfinite(u) & np.isfinite(err)
            if keep.any():
                section.figure(self.save(plots.uncertainty_error(u[keep], err[keep], None if flagged is None
                                                                 else flagged[keep], "uncertainty against error"),
                                         "uncertainty-error", "Per-case mean entropy against 1 − mean Dice; "
                                                              "cases the review flag sent to a person in red."))

    def _quality(self, section: Section, rows: list[dict[str, Any]], names: list[str]) -> None:
        """A calibrated model's interval coverage, predicted Dice and review flag against the truth."""
        if any(f"volume_interval_coverage/{n}" in self.main.metrics for n in names):
            section.heading("Volume intervals")
            section.table(["structure", "coverage", "mean width (mm³)"], [
                [Cell(n, text_cell=True), self.shown(f"volume_interval_coverage/{n}", 3),
                 self.shown(f"volume_interval_width/{n}", 0)] for n in names],
                caption="How often each case's volume interval held the reference volume, against its nominal "
                        f"{self.main.summary.get('interval', 0.9):.0%}.")
        scored = [r for r in rows if f"predicted_dice/{names[0]}" in r and math.isfinite(r.get(f"dice/{names[0]}",
                                                                                                 math.nan))]
        if not scored:
            return
        section.heading("Predicted Dice and the review flag")
        section.table(["failures", "missed failures (share of cases)", "failure AUROC", "AURC", "optimal AURC",
                       "predicted Dice MAE", "flagged out of distribution"], [[
            self.shown("failures", 0), self.shown("missed_failure_rate", 3), self.shown("failure_auroc", 3),
            self.shown("aurc", 4), self.shown("aurc_optimal", 4), self.shown("predicted_dice_mae", 3),
            self.shown("ood_fraction", 3)]],
            caption="A failure: a case whose worst structure's Dice is below the calibration's failure level. The "
                    "review flag bounds the chance of a failure going unflagged (conformal risk control); AURC "
                    "is the area under the risk–coverage curve, lower is better.")
        predicted = np.array([min(r[f"predicted_dice/{n}"] for n in names) for r in scored])
        true = np.array([min(r[f"dice/{n}"] for n in names) for r in scored])
        section.figure(self.save(plots.predicted_against_true(true, predicted, None, None, "worst-structure Dice"),
                                 "predicted-dice", f"Predicted against true worst-structure Dice ({len(scored)} "
                                                   "cases)."))
        curve, best = risk_coverage(predicted, true), risk_coverage(true, true)
        section.figure(self.save(plots.risk_coverage({"predicted Dice": (curve["coverage"], curve["risk"]),
                                                      "oracle": (best["coverage"], best["risk"])},
                                                     "risk–coverage"), "risk-coverage",
                                 "Risk–coverage: keeping the cases with the highest predicted Dice first, the mean "
                                 "error of those kept; the oracle keeps them by their true Dice."))

    def training(self) -> None:
        histories = self.main.histories()
        if not histories:
            return
        section = self._section("training", "Training")
        for label, epochs in histories:
            if not epochs:
                continue
            x = np.array([e["epoch"] for e in epochs], dtype=float)

            def series(prefix: str) -> dict[str, np.ndarray]:
                keys = sorted({k for e in epochs for k in e if k.startswith(prefix)})
                return {k.removeprefix(prefix): np.array([e.get(k, np.nan) for e in epochs]) for k in keys}

            losses = {k: v for k, v in series("train/").items() if np.nanmax(np.abs(v), initial=0) > 0}
            shown = ("dice", "mmse_mae", "cdr_qwk", "c_index", "score")
            validation = {k: v for k, v in series("val/").items() if k in shown and np.isfinite(v).any()}
            if losses:
                section.figure(self.save(plots.curves(x, losses, "training loss", f"{label}: training loss per task",
                                                      log=True), f"losses-{label}",
                                         f"{label}: the training loss of each task per epoch."))
            if validation:
                section.figure(self.save(plots.curves(x, validation, "validation metric",
                                                      f"{label}: validation per epoch"), f"validation-{label}",
                                         f"{label}: validation metrics per epoch (the checkpoint is chosen by score)."))
            weights = series("weight/")
            if weights and losses:
                section.figure(self.save(plots.curves(x, {k: weights[k] for k in losses if k in weights}, "weight",
                                                      f"{label}: task weights"), f"weights-{label}",
                                         f"{label}: the loss balancer's weight of each task per epoch."))

    def comparison(self) -> None:
        if len(self.evaluations) < 2:
            return
        section = self._section("comparison", "Comparison")
        names = [e.name for e in self.evaluations]
        if len(set(names)) != len(names):
            raise ValueError(f"evaluations need distinct names to be compared, got {names}")
        differences = compare({e.name: e.cases for e in self.evaluations})
        reference = names[0]
        section.note(f"Each model against {reference} on the cases both predicted: mean paired difference "
                     f"(model − {reference}) with its 95 % bootstrap interval and the Wilcoxon signed-rank p.")
        section.table(["metric", "model", "cases", f"{reference}", "model mean", "difference", "95 % interval",
                       "Wilcoxon p", "better"], [
            [Cell(d.metric, text_cell=True), Cell(d.model, text_cell=True), Cell(str(d.n)),
             Cell(number(d.reference_mean)), Cell(number(d.model_mean)),
             self.doc.value(f"compare/{d.model}/{d.metric}/difference", d.difference),
             Cell(f"{number(d.low)} to {number(d.high)}"),
             self.doc.value(f"compare/{d.model}/{d.metric}/p", d.p), Cell(d.better, text_cell=True)]
            for d in differences])
        keys = [k for k in self.main.summary["metrics"] if all(k in e.summary["metrics"] for e in self.evaluations)]
        shown = [k for k in keys if not k.startswith(("volume_pairs/", "mean_volume", "uncertainty_error_cases",
                                                      "worst_decile_cases", "mmse_interval_cases"))]
        section.heading("Cohort metrics side by side")
        section.table(["metric", *names], [[Cell(k, text_cell=True)] + [
            Cell(number(e.metrics.get(k))) for e in self.evaluations] for k in shown],
            caption="Cohort-level figures (QWK, C-index, ECE) have no per-case pairing; compare them with their spread "
                    "across runs in mind.")

    def _section(self, anchor: str, title: str) -> Section:
        section = Section(anchor, title)
        self.doc.sections.append(section)
        return section

    def build(self) -> Document:
        self.overview()
        for part in (self.segmentation, self.outcomes, self.trust, self.training, self.comparison):
            part()
        return self.doc


def build_report(folders: list[str | Path], out: str | Path, names: list[str] | None = None) -> Document:
    """Write the evaluation report of ``folders`` (``evaluate`` outputs; the first is the main one, the
    others are compared with it) to ``out`` (HTML), its figures to ``<out stem>_figures/`` and its numbers
    to ``<out>.json``; ``names``: one label per folder (default: the folder names)."""
    if names is not None and len(names) != len(folders):
        raise ValueError(f"{len(names)} names for {len(folders)} evaluations")
    paths = [Path(f) for f in folders]
    if names is None:  # folder names, or parent/folder where two share a name
        names = [p.name for p in paths]
        if len(set(names)) < len(names):
            names = [f"{p.parent.name}/{p.name}" for p in paths]
    evaluations = [load_evaluation(p, n) for p, n in zip(paths, names)]
    out = Path(out)
    document = ReportBuilder(evaluations, out.parent / f"{out.stem}_figures").build()
    render(document, out)
    return document

