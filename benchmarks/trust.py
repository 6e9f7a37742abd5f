"""Trustworthy uncertainty on real MRI: calibration, conformal intervals, the review flag and the
out-of-distribution test of a model trained on MSD Task04 hippocampus, measured on cases that played no
part in fitting anything.

Protocol:

1. **Model.** ``benchmarks/accuracy_msd.py --test-fraction 0.45`` trains on 55 % of the 220 labelled cases
   (fold ``train.fold`` of them chooses the checkpoint) and holds out 99. Its first 44 (``--test-seed 0``'s
   permutation) are the same 44 test cases as every other MSD figure; the other 55 are the
   **calibration** cases. ``--checkpoint`` names its best checkpoint.
2. **Calibration.** ``jointray calibrate`` on the 55 (``--mc-samples``, ``--mc-mode``, mirroring): voxel
   scaling chosen by held-out NLL, conformal volume intervals, predicted Dice with a risk-controlled review
   threshold, the OOD test.
3. **Test (44 cases).** ``evaluate`` of the model and of the calibrated model with the same settings:
   voxel ECE over all voxels and over the foreground (before → after), per-structure ECE, Brier score and
   NLL on the foreground voxels, Dice change, volume interval coverage and width at 90 % (conformal against
   the Monte Carlo quantile interval), the review flag (share flagged, recall of the worst decile, missed
   failures, AURC and failure AUROC), and the time per case.
4. **Partitions.** The 99 held-out cases' rows from one calibrated pass (the voxel scaling of step 2 kept),
   split ``--partitions`` times at random into 55 calibration and 44 test cases: per split the intervals,
   the quality model, the review threshold and the OOD test are refitted on its calibration part and
   scored on its test part (coverage at 50–95 %, flag and missed-failure rates). The voxel scaling (three
   numbers fitted on the first 55) is the only part not refitted.
5. **Out of distribution.** Each test image turned into six kinds of input the model should not answer
   (uniform noise, inverted contrast, a T2-like contrast, the anatomy shuffled in 8-voxel blocks, a CT-like
   Hounsfield range, an empty field of view with scanner noise), predicted without labels: the share of
   each flagged, against the false-flag share of the real test cases.

``--sources`` instead compares other sources of uncertainty with the main run's (mirroring with 20 Monte
Carlo samples of the decoder): one pass, mirroring alone, mirroring with 20 samples of the whole network;
each calibrated on the calibration cases and scored on the test cases before and after: foreground ECE,
near-structure Brier and NLL, failure AUROC, AURC, time.

Prints the tables and writes JSON.

    python benchmarks/accuracy_msd.py --test-fraction 0.45 --minutes 15 --split-dir runs/trust_msd_split \\
        train.name=trust_msd data.output=runs/prepared/trust_msd
    python benchmarks/trust.py --checkpoint runs/trust_msd/best --split-dir runs/trust_msd_split

MSD Task04 Hippocampus: Simpson et al., arXiv:1902.09063, CC-BY-SA 4.0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy_msd import hold_out, msd_list

from jointray.artifacts import load_models
from jointray.config import RayConfig
from jointray.data.sources import scan_msd
from jointray.inference.calibrate import calibrate
from jointray.inference.evaluate import evaluate
from jointray.metrics.trust import case_dice, worst_decile
from jointray.runtime import init_ray
from jointray.trust import quality as quality_module
from jointray.trust.calibration import fit_calibration
from jointray.trust.ood import FEATURES as OOD_FEATURES
from jointray.trust.ood import feature_key as ood_key

REPO = Path(__file__).resolve().parents[1]
LEVELS = (0.5, 0.8, 0.9, 0.95)
OOD_KINDS = ("noise", "inverted", "t2_like", "shuffled_blocks", "ct_like", "empty")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="trained by accuracy_msd.py --test-fraction 0.45")
    parser.add_argument("--root", default=str(REPO.parent / "shared" / "data" / "msd_hippocampus"))
    parser.add_argument("--split-dir", default="runs/trust_msd_split", help="accuracy_msd.py's --split-dir")
    parser.add_argument("--mc-samples", type=int, default=20)
    parser.add_argument("--mc-mode", default="decoder")
    parser.add_argument("--partitions", type=int, default=20)
    parser.add_argument("--sources", action="store_true", help="compare the sources of uncertainty instead "
                        "(one pass, mirroring, MC decoder, MC full; each calibrated): trust_sources.json")
    parser.add_argument("--work", default="runs/trust_bench", help="calibrated model and evaluations")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "trust.json"))
    return parser.parse_args(argv)


def splits(root: Path, checkpoint: str, work: Path) -> tuple[Path, Path, list[str], list[str]]:
    """(calibration folder, test folder, their subject IDs): the model's held-out cases minus the standard 44."""
    cfg = load_models(checkpoint).members[0].config
    trained = {r.subject_id for r in scan_msd(Path(cfg.data.root), cfg.data.label_names).records}
    _, test_folder, test_ids = hold_out(root, cfg.data.label_names, 0.2, 0, work / "standard_split")
    records = sorted(scan_msd(root, cfg.data.label_names).records, key=lambda r: r.subject_id)
    held = [r for r in records if r.subject_id not in trained]
    if test_ids - {r.subject_id for r in held}:
        raise SystemExit(f"{checkpoint} trained on some of the 44 standard test cases: train it with "
                         "accuracy_msd.py --test-fraction 0.45")
    cal = [r for r in held if r.subject_id not in test_ids]
    return msd_list(root, cal, work / "calibration"), test_folder, [r.subject_id for r in cal], sorted(test_ids)


def voxel_figures(report) -> dict[str, float]:
    """Foreground ECE, Brier and NLL and per-structure ECE from the voxel samples of an evaluation."""
    from jointray.metrics import class_calibration_error

    probabilities = np.concatenate([p for p, _ in report.voxels.values()]).astype(np.float64)
    labels = np.concatenate([t for _, t in report.voxels.values()])
    onehot = np.eye(probabilities.shape[1])[labels]
    figures = {"near_structure_brier": float(((probabilities - onehot) ** 2).sum(1).mean()),
               "near_structure_nll": float(-np.log(np.maximum(probabilities[np.arange(len(labels)), labels],
                                                              1e-12)).mean()),
               "near_structure_ece": class_calibration_error(probabilities, labels)}
    for k in range(1, probabilities.shape[1]):
        near = (probabilities.argmax(1) == k) | (labels == k)
        figures[f"ece_structure_{k}"] = class_calibration_error(probabilities[near], labels[near])
    return figures


def assess(calibration, row: dict, structures: list[str], level: float) -> dict:
    """What a calibration says of one stored row (its point, SD and features), as the predictor would."""
    out = {}
    for name in structures:
        conformal = calibration.volume[name]
        low, high = conformal.interval([row[f"volume/{name}"]], [row[f"volume_sd/{name}"]], level, low=0.0)[0]
        out[name] = (low, high)
    features = quality_module.features_of(row, structures)
    worst = float(calibration.quality.predict(features).min())
    p = calibration.ood.p_value(np.array([row.get(ood_key(f), math.nan) for f in OOD_FEATURES]))
    found = all(row[f"volume/{n}"] > 0 for n in structures)
    out["flagged"] = (worst < calibration.review_threshold) or p <= calibration.ood_alpha or not found
    out["quality"] = worst
    return out


def partition_figures(rows: list[dict], structures: list[str], settings, scaling, n_cal: int, repeats: int,
                      failure_dice: float, alpha: float) -> dict:
    rng = np.random.default_rng(0)
    per = {f"coverage_{level}": [] for level in LEVELS} | {"width_0.9": [], "flagged": [], "missed": [],
                                                           "recall_worst_decile": [], "failure_auroc": []}
    for _ in range(repeats):
        order = rng.permutation(len(rows))
        cal, test = [rows[i] for i in order[:n_cal]], [rows[i] for i in order[n_cal:]]
        calibration = fit_calibration(cal, structures, settings, scaling=scaling, failure_dice=failure_dice,
                                      review_alpha=alpha)
        for level in LEVELS:
            hits = [low <= r[f"volume_ref/{n}"] <= high for r in test for n in structures
                    for low, high in [assess(calibration, r, structures, level)[n]]]
            per[f"coverage_{level}"].append(float(np.mean(hits)))
        judged = [assess(calibration, r, structures, 0.9) for r in test]
        per["width_0.9"].append(float(np.mean([a[n][1] - a[n][0] for a in judged for n in structures])))
        flagged = np.array([a["flagged"] for a in judged])
        dice = np.array([min(r[f"dice/{n}"] for n in structures) for r in test])
        per["flagged"].append(float(flagged.mean()))
        per["missed"].append(float(((dice < failure_dice) & ~flagged).mean()))
        worst = worst_decile(np.array([case_dice(r, structures) for r in test]))
        per["recall_worst_decile"].append(float(flagged[worst].mean()))
    return {k: {"mean": float(np.mean(v)), "sd": float(np.std(v)), "min": float(np.min(v)), "max": float(np.max(v))}
            for k, v in per.items() if v}


def odd_inputs(test_folder: Path, folder: Path) -> dict[str, Path]:
    """Per OOD kind, a folder of the test images turned into that kind (no labels)."""
    rng = np.random.default_rng(0)
    meta = json.loads((test_folder / "dataset.json").read_text())
    folders = {kind: folder / kind for kind in OOD_KINDS}
    for path in folders.values():
        path.mkdir(parents=True, exist_ok=True)
    for entry in meta["training"]:
        source = nib.load(entry["image"])
        image = np.asarray(source.dataobj, dtype=np.float32)
        top = float(np.percentile(image, 99))
        blocks = image.copy()
        b = 8
        shape = [s // b * b for s in image.shape]
        tiles = [blocks[i:i + b, j:j + b, k:k + b].copy() for i in range(0, shape[0], b)
                 for j in range(0, shape[1], b) for k in range(0, shape[2], b)]
        order = rng.permutation(len(tiles))
        t = 0
        for i in range(0, shape[0], b):
            for j in range(0, shape[1], b):
                for k in range(0, shape[2], b):
                    blocks[i:i + b, j:j + b, k:k + b] = tiles[order[t]]
                    t += 1
        normalised = np.clip(image / max(top, 1e-6), 0, 1)
        kinds = {
            "noise": rng.uniform(0, top, image.shape),
            "inverted": top - np.clip(image, 0, top),
            # T2-like: fluid bright, white matter darker than grey matter: a non-monotone remapping of T1.
            "t2_like": top * (1 - normalised) ** 0.5 * (0.6 + 0.4 * np.sin(np.pi * normalised)),
            "shuffled_blocks": blocks,
            "ct_like": normalised * 80.0 - 1000.0 * (normalised < 0.05) + rng.normal(0, 5, image.shape),
            "empty": np.abs(rng.normal(0, 0.02 * top, image.shape)),
        }
        name = Path(entry["image"]).name
        for kind, array in kinds.items():
            nib.save(nib.Nifti1Image(array.astype(np.float32), source.affine), folders[kind] / name)
    return folders


def table(title: str, columns: list[str], rows: list[list[str]]) -> Table:
    out = Table(title=title)
    for column in columns:
        out.add_column(column, justify="right")
    for row in rows:
        out.add_row(*row)
    return out


#: The sources of uncertainty compared by ``--sources``: (name, mirroring, Monte Carlo samples, mode). Mirroring
#: with 20 samples of the decoder is the main run's (the calibrated default), not repeated here.
SOURCES = (("one pass", False, 1, "decoder"), ("mirroring", True, 1, "decoder"),
           ("mirroring + MC full", True, 20, "full"))


def compare_sources(checkpoint: str, cal_folder: Path, test_folder: Path, work: Path, console: Console) -> dict:
    """Each source of uncertainty calibrated on the calibration cases and scored on the test cases, before and
    after calibration: voxel ECE and near-structure Brier and NLL, the review flag's figures, seconds per case."""
    results = {}
    for name, mirror, samples, mode in SOURCES:
        calibration, folder = calibrate(checkpoint, cal_folder, work / f"source_{samples}_{mode}_{mirror}",
                                        tta=mirror, mc_samples=samples, mc_mode=mode)
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            plain = evaluate(checkpoint, test_folder, Path(tmp) / "plain", tta=mirror, mc_samples=samples,
                             mc_mode=mode, collect_voxels=20_000)
            seconds = (time.perf_counter() - started) / plain.predicted
            honest = evaluate(folder, test_folder, Path(tmp) / "calibrated", collect_voxels=20_000)
        before, after = voxel_figures(plain), voxel_figures(honest)
        results[name] = {"seconds_per_case": seconds, "scaling": calibration.scaling_method,
                         "before": {"voxel_ece_foreground": plain.metrics["voxel_ece/foreground"], **before},
                         "after": {"voxel_ece_foreground": honest.metrics["voxel_ece/foreground"], **after,
                                   **{k: honest.metrics.get(k, math.nan) for k in (
                                       "dice", "failure_auroc", "aurc", "missed_failure_rate",
                                       "volume_interval_coverage/anterior", "volume_interval_coverage/posterior",
                                       "volume_interval_width/anterior", "volume_interval_width/posterior")}}}
    console.print(table("Sources of uncertainty on the 44 test cases (before → after calibration)",
                        ["source", "s/case", "fg ECE", "near Brier", "near NLL", "AUROC", "AURC", "Dice"],
                        [[n, f"{r['seconds_per_case']:.2f}",
                          f"{r['before']['voxel_ece_foreground']:.3f} → {r['after']['voxel_ece_foreground']:.3f}",
                          f"{r['before']['near_structure_brier']:.4f} → {r['after']['near_structure_brier']:.4f}",
                          f"{r['before']['near_structure_nll']:.4f} → {r['after']['near_structure_nll']:.4f}",
                          f"{r['after']['failure_auroc']:.3f}", f"{r['after']['aurc']:.4f}",
                          f"{r['after']['dice']:.4f}"] for n, r in results.items()]))
    return results


def main() -> None:
    args = parse_args()
    console = Console(width=180)
    work = Path(args.work)
    init_ray(RayConfig())
    cal_folder, test_folder, cal_ids, test_ids = splits(Path(args.root), args.checkpoint, work)
    console.print(f"calibration cases: {len(cal_ids)}; test cases: {len(test_ids)}")
    if args.sources:
        sources = compare_sources(args.checkpoint, cal_folder, test_folder, work, console)
        out = Path(args.out).with_name("trust_sources.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(sources, indent=2, default=float) + "\n")
        return
    started = time.perf_counter()
    calibration, calibrated = calibrate(args.checkpoint, cal_folder, work / "calibrated", mc_samples=args.mc_samples,
                                        mc_mode=args.mc_mode)
    calibrate_s = time.perf_counter() - started
    structures = list(calibration.volume)
    settings = {"mc_samples": args.mc_samples, "mc_mode": args.mc_mode, "tta": True}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        plain = evaluate(args.checkpoint, test_folder, tmp / "plain", collect_voxels=20_000, **settings)
        plain_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        honest = evaluate(calibrated, test_folder, tmp / "calibrated", collect_voxels=20_000, **settings)
        honest_s = time.perf_counter() - t0
        pooled = evaluate(calibrated, cal_folder, tmp / "calibration_rows", **settings).rows + honest.rows
        folders = odd_inputs(test_folder, tmp / "odd")
        odd = {kind: evaluate(calibrated, folder, tmp / f"odd_{kind}", **settings) for kind, folder in folders.items()}
    before, after = voxel_figures(plain), voxel_figures(honest)

    m0, m1 = plain.metrics, honest.metrics
    console.print(table(
        f"Voxel calibration on {len(test_ids)} held-out test cases ({calibration.scaling_method}; mask "
        f"{'calibrated argmax' if calibration.mask_calibrated else 'unchanged'})",
        ["figure", "model", "calibrated", "change"],
        [[k, f"{a:.4f}", f"{b:.4f}", f"{b - a:+.4f}"] for k, a, b in [
            ("voxel ECE, all voxels", m0["voxel_ece/all"], m1["voxel_ece/all"]),
            ("voxel ECE, foreground", m0["voxel_ece/foreground"], m1["voxel_ece/foreground"]),
            *[(k.replace("_", " "), before[k], after[k]) for k in before],
            ("mean Dice", m0["dice"], m1["dice"]),
            *[(f"Dice {n}", m0[f"dice/{n}"], m1[f"dice/{n}"]) for n in structures]]]))
    coverage_rows = [[n, f"{m0[f'volume_interval_coverage/{n}']:.3f}", f"{m0[f'volume_interval_width/{n}']:.0f}",
                      f"{m1[f'volume_interval_coverage/{n}']:.3f}", f"{m1[f'volume_interval_width/{n}']:.0f}"]
                     for n in structures]
    console.print(table("Volume intervals at 90 % on the 44 test cases", ["structure", "MC coverage", "MC width mm³",
                                                                         "conformal coverage", "conformal width mm³"],
                        coverage_rows))
    flagged = np.array([r["needs_review"] for r in honest.rows])
    worst = worst_decile(np.array([case_dice(r, structures) for r in honest.rows]))
    review = {"flagged": float(flagged.mean()), "recall_worst_decile": float(flagged[worst].mean()),
              "missed_failure_rate": m1.get("missed_failure_rate", math.nan), "failures": m1.get("failures"),
              "aurc": m1.get("aurc"), "aurc_optimal": m1.get("aurc_optimal"),
              "failure_auroc": m1.get("failure_auroc"), "predicted_dice_mae": m1.get("predicted_dice_mae"),
              "threshold": calibration.review_threshold,
              "ood_false_flags": float(np.mean([str(r["review_reasons"]).startswith("input unlike")
                                                for r in honest.rows]))}
    console.print(table("Review flag on the 44 test cases", ["figure", "value"],
                        [[k, f"{v:.3f}" if isinstance(v, float) else str(v)] for k, v in review.items()]))
    partitions = partition_figures(pooled, structures, calibration.settings, calibration.scaling, len(cal_ids),
                                   args.partitions, calibration.failure_dice, calibration.review_alpha)
    console.print(table(f"{args.partitions} random splits of the 99 held-out cases into {len(cal_ids)} calibration "
                        f"and {len(test_ids)} test", ["figure", "mean", "SD", "min", "max"],
                        [[k, *(f"{v[s]:.3f}" for s in ("mean", "sd", "min", "max"))] for k, v in partitions.items()]))
    ood = {kind: float(np.mean([str(r.get("review_reasons", "")).startswith("input unlike") for r in report.rows]))
           for kind, report in odd.items()}
    console.print(table("Out-of-distribution inputs flagged (44 each)", ["kind", "flagged"],
                        [[k, f"{v:.3f}"] for k, v in ood.items()] + [["real test cases", f"{review['ood_false_flags']:.3f}"]]))
    seconds = {"calibrate_total_s": calibrate_s, "evaluate_model_s_per_case": plain_s / len(test_ids),
               "evaluate_calibrated_s_per_case": honest_s / len(test_ids)}
    console.print(seconds)
    summary = {
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "checkpoint": args.checkpoint,
        "calibration_cases": len(cal_ids), "test_cases": len(test_ids), "settings": settings,
        "calibration": {"scaling_method": calibration.scaling_method, "scaling": calibration.scaling.__dict__
                        if calibration.scaling else None, "mask_calibrated": calibration.mask_calibrated,
                        "fit_metrics": calibration.fit_metrics, "review_threshold": calibration.review_threshold},
        "test": {"model": {k: v for k, v in m0.items() if isinstance(v, float)} | before,
                 "calibrated": {k: v for k, v in m1.items() if isinstance(v, float)} | after},
        "review": review, "partitions": partitions, "ood_flagged": ood, "seconds": seconds,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
