"""The per-patient report: one HTML page about one prediction that a researcher can hand on.

Built from what the prediction already says (the JSON answer of ``POST /v1/predict`` and ``jointray
predict``, :func:`jointray.inference.answers.answer`), the input as it was read, the mask and the voxel
entropy: three orthogonal slices with the mask and with the uncertainty, structure volumes with their
Monte Carlo intervals, the outcome predictions with intervals and what they mean, the review flag and
why, the model's version and its validation figures, and a plain statement that this is research
software, not a diagnosis. :func:`print_to_pdf` makes a PDF of it with headless Chromium where one is
installed.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from jointray.inference.explain import Explanation
from jointray.report import figures as plots
from jointray.report.document import Cell, Document, Section, number, to_html

#: What each CDR stage means (Morris 1993, the Clinical Dementia Rating).
CDR_MEANING = {"0": "no dementia", "0.5": "questionable or very mild dementia", "1": "mild dementia",
               "2": "moderate dementia (or worse, where the model merges stages 2 and 3)", "3": "severe dementia"}
#: Conventional MMSE bands (Folstein et al. 1975; cut-offs as commonly used, e.g. Tombaugh & McIntyre 1992).
MMSE_BANDS = ((24, "no cognitive impairment indicated (24–30)"), (18, "mild impairment range (18–23)"),
              (0, "moderate to severe impairment range (0–17)"))
#: The validation figures shown, where the model has them.
VALIDATION_SHOWN = {"val/dice": "mean Dice", "val/mmse_mae": "MMSE MAE", "val/cdr_qwk": "CDR QWK",
                    "val/c_index": "risk C-index", "out_of_fold/dice": "out-of-fold mean Dice"}
PDF_TIMEOUT_S = 120


def mmse_meaning(score: float) -> str:
    return next(text for floor, text in MMSE_BANDS if score >= floor)


def patient_document(body: dict[str, Any], image: np.ndarray, affine: np.ndarray, mask: np.ndarray | None,
                     entropy: np.ndarray | None, model_metrics: dict[str, float], classes: int,
                     explanation: Explanation | None = None) -> Document:
    """The report of one prediction.

    Args:
        body: the JSON answer (:func:`jointray.inference.answers.answer`).
        image: (X, Y, Z) the input's first channel on its own grid; ``affine`` its voxel-to-RAS mm map.
        mask: (X, Y, Z) the predicted label mask on that grid; None for a model without segmentation.
        entropy: (X, Y, Z) the voxel predictive entropy (nats) on that grid, or None.
        model_metrics: the model's validation figures (``val/...``), as its checkpoint carries them.
        classes: segmentation classes K (entropy runs from 0 to ln K).
        explanation: class activation maps on the input's grid and clinical attributions
            (:func:`jointray.inference.explain.explain_case`), shown in their own section where given.
    """
    name, model, mc = body["input"]["name"], body["model"], body["mc"]
    level = f"{mc['interval']:.0%}"
    doc = Document(title=f"jointray case report: {name}")
    doc.meta = [
        f"input: {name}, {' × '.join(map(str, body['input']['shape']))} voxels of "
        f"{' × '.join(f'{s:.3g}' for s in body['input']['spacing_mm'])} mm",
        f"model: {model['name']} ({model['variant']}), version {model['version']}; Monte Carlo samples: "
        f"{mc['samples']} ({mc['mode']}), intervals: {level}",
        f"report written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
    ]
    review = Section("review", "Review")
    doc.sections.append(review)
    trust = body.get("trust", {})
    if body["needs_review"]:
        review.warning("Needs review by a person: " + "; ".join(body["review"]["reasons"]) + ".")
    elif trust.get("calibrated"):
        review.note("No review flag: the input is like the calibration cases, every structure was found and the "
                    f"predicted worst-structure Dice is at least {body['review']['predicted_dice_threshold']:.3f}.")
    else:
        review.note(f"No review flag: every structure was found, with mean entropy under "
                    f"{body['review']['entropy_threshold']:g} nats and a volume SD under "
                    f"{body['review']['volume_cv_threshold']:.0%} of its mean.")
    # What the figures promise, in the words the calibration states it (or that they promise nothing).
    for key in ("statement", "review_statement", "ood_statement", "note"):
        if trust.get(key):
            review.note(trust[key])
    if mask is not None:
        _segmentation(doc, body, image, affine, mask, entropy, classes, level)
    if body["outcomes"]:
        _outcomes(doc, body["outcomes"], level)
    if explanation is not None:
        _explanations(doc, explanation, image, affine, mask)
    shown = {label: model_metrics[key] for key, label in VALIDATION_SHOWN.items()
             if key in model_metrics and math.isfinite(model_metrics[key])}
    about = Section("model", "The model")
    doc.sections.append(about)
    about.note(f"{model['name']} ({model['variant']}), version {model['version']}. Its figures on the cases that chose "
               "it (validation; optimistic against new cases):" if shown else
               f"{model['name']} ({model['variant']}), version {model['version']}: no validation figures recorded.")
    if shown:
        about.table(list(shown), [[Cell(number(v, 3)) for v in shown.values()]])
    return doc


def _segmentation(doc: Document, body: dict[str, Any], image: np.ndarray, affine: np.ndarray, mask: np.ndarray,
                  entropy: np.ndarray | None, classes: int, level: str) -> None:
    section = Section("segmentation", "Segmentation")
    doc.sections.append(section)
    shown = plots.to_ras(image.astype(np.float32), affine)
    labels = plots.to_ras(mask, affine)
    centre = plots.centre_of(labels)
    section.figure(plots.save(plots.slices(shown, labels, None, centre, "predicted structures"), None,
                              "Three slices through the predicted structures' centre, structures in colour."))
    if entropy is not None:
        section.figure(plots.save(plots.slices(shown, None, None, centre, "voxel uncertainty (entropy)",
                                               heat=plots.to_ras(entropy, affine), heat_max=math.log(classes)),
                                  None, f"Predictive entropy per voxel, 0 to ln {classes} nats: bright where the model "
                                        "is unsure, typically at the structures' borders."))
    section.table(["structure", "volume (mm³)", "Monte Carlo mean ± SD", f"{level} interval", "predicted Dice",
                   "mean entropy (nats)", "mutual information"], [
        [Cell(s, text_cell=True), Cell(number(v["volume_mm3"]["mask"], 0)),
         Cell(f"{number(v['volume_mm3']['mean'], 0)} ± {number(v['volume_mm3']['std'], 0)}"),
         Cell(_interval(v["volume_mm3"], 0)), Cell(number(v.get("predicted_dice"), 3)),
         Cell(number(v["uncertainty"]["entropy"], 3)), Cell(number(v["uncertainty"]["mutual_information"], 3))]
        for s, v in body["structures"].items()])


#: How each interval method reads in a report.
INTERVAL_WORDS = {"conformal_normalised": "conformal", "conformal": "conformal, one width",
                  "monte_carlo": "Monte Carlo, no guarantee"}


def _interval(estimate: dict[str, Any], digits: int) -> str:
    low, high = estimate["interval"]
    bounds = f"{number(low, digits) if low is not None else '−∞'} – {number(high, digits) if high is not None else '∞'}"
    return f"{bounds} ({INTERVAL_WORDS.get(estimate.get('interval_method'), 'Monte Carlo, no guarantee')})"


def _outcomes(doc: Document, outcomes: dict[str, Any], level: str) -> None:
    section = Section("outcomes", "Clinical outcomes")
    doc.sections.append(section)
    rows = []
    if "mmse" in outcomes:
        m = outcomes["mmse"]
        rows.append([Cell("MMSE (0–30)", text_cell=True), Cell(number(m["point"], 1)), Cell(_interval(m, 1)),
                     Cell(mmse_meaning(m["point"]), text_cell=True)])
    if "cdr" in outcomes:
        c = outcomes["cdr"]
        stage = f"{c['stage']:g}"
        spread = ", ".join(f"{s}: {p:.0%}" for s, p in c["probabilities"].items())
        if c.get("set"):
            spread = f"conformal set {{{', '.join(c['set'])}}}; {spread}"
        rows.append([Cell("CDR stage", text_cell=True), Cell(stage), Cell(spread),
                     Cell(CDR_MEANING.get(stage, stage), text_cell=True)])
    if "risk" in outcomes:
        r = outcomes["risk"]
        rows.append([Cell("time-to-event risk", text_cell=True), Cell(number(r["point"], 2)),
                     Cell(f"{number(r['interval'][0], 2)} – {number(r['interval'][1], 2)}"),
                     Cell("a relative score (Cox log hazard): higher means an earlier expected event than for a "
                          "lower score; not a probability", text_cell=True)])
    if "risk_by_horizon" in outcomes:
        h = outcomes["risk_by_horizon"]
        rows.append([Cell(f"event by {h['horizon']:.3g} (time units of training)", text_cell=True),
                     Cell(f"{h['probability']:.0%}"), Cell("—"),
                     Cell("an absolute probability: the Cox score's baseline hazard (Breslow) fitted on the "
                          "calibration cases", text_cell=True)])
    section.table(["outcome", "prediction", f"{level} interval / stage probabilities", "what it means"], rows)
    section.note("A conformal interval or set holds the truth for the stated share of cases like the calibration "
                 "cases (the Review section says how many); a Monte Carlo interval is the model's own spread and "
                 "promises no coverage. Neither is a clinical confidence interval for this patient.")


def _explanations(doc: Document, explanation: Explanation, image: np.ndarray, affine: np.ndarray,
                  mask: np.ndarray | None) -> None:
    section = Section("explanations", "Explanations")
    doc.sections.append(section)
    method = explanation.method
    if explanation.maps:
        section.note(f"{method}: where in the image the layer that decides each output found what raised it "
                     "(bright = more), scaled to 0–1 per output. For a structure the output is its mean score over "
                     "the voxels predicted as it, so its map stays near them; an outcome's may lie anywhere. A map "
                     "shows what the model used, not that it was right to.")
    shown = plots.to_ras(image.astype(np.float32), affine)
    centre = plots.centre_of(None if mask is None else plots.to_ras(mask, affine), shown > np.median(shown))
    for target, heat in explanation.maps.items():
        figure = plots.slices(shown, None, None, centre, f"{method}: {target}", heat=plots.to_ras(heat, affine))
        section.figure(plots.save(figure, None, f"{method} of {target} at layer {explanation.layers[target]}."))
    if explanation.attributions:
        heads = list(explanation.attributions)
        features = list(next(iter(explanation.attributions.values())))
        section.table(["clinical feature", *heads], [
            [Cell(f, text_cell=True)] + [Cell(number(explanation.attributions[h][f], 3)) for h in heads]
            for f in features], caption="Integrated Gradients from the record with every feature missing: how much "
                                        "knowing each feature moved each prediction (CDR: its stage logits' sum).")
        section.figure(plots.save(plots.attribution_bars(explanation.attributions), None,
                                  "Clinical feature attributions per outcome (red raises the output, blue lowers it)."))


def write_patient_report(document: Document, path: Path) -> Path:
    """Write the page (figures embedded) to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_html(document))
    return path


def print_to_pdf(html: Path) -> Path | None:
    """``html`` printed to ``<stem>.pdf`` beside it by headless Chromium; None where no Chromium is installed."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        return None
    pdf = html.with_suffix(".pdf")
    subprocess.run([browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-pdf-header-footer",
                    f"--print-to-pdf={pdf}", html.resolve().as_uri()], check=True, capture_output=True,
                   timeout=PDF_TIMEOUT_S)
    return pdf
