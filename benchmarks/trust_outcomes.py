"""Honest outcome figures on the synthetic cohort: conformal MMSE intervals, CDR sets and the risk as an
absolute probability, on subjects that played no part in training or calibration.

Protocol: ``configs/synthetic.yaml`` trains ``v2`` on its 96 subjects (seed 0; its own validation fold
chooses the checkpoint). Two further cohorts from the same generator with other seeds are the
**calibration** (``--seed-cal``) and **test** (``--seed-test``) subjects (``--subjects`` each).
``jointray calibrate`` fits on the first; ``evaluate`` of the model and of the calibrated model, with the
same Monte Carlo settings, scores the second: MMSE coverage and width at 90 % (conformal against the Monte
Carlo quantile interval), CDR set coverage and size, the absolute risk's calibration at its horizon
(mean predicted against Kaplan–Meier, by tertile), volume interval coverage. Then ``--partitions`` random
splits of the pooled calibration + test rows refit the MMSE intervals and CDR sets on one half and score
them on the other, at 50–95 %.

    python benchmarks/trust_outcomes.py [--subjects 150] [--partitions 20]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trust import LEVELS, table  # sets Ray's environment for a quiet local run, as every benchmark does

from jointray.config import load_config
from jointray.data.prepare import prepare_dataset
from jointray.data.synthetic import generate_cohort
from jointray.inference.calibrate import calibrate
from jointray.inference.evaluate import evaluate
from jointray.runtime import init_ray
from jointray.train.trainer import run_training
from jointray.trust.conformal import ConformalInterval, OrdinalSet
from jointray.trust.survival import check_at_horizon

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=150, help="subjects in each of the two held-out cohorts")
    parser.add_argument("--seed-cal", type=int, default=1)
    parser.add_argument("--seed-test", type=int, default=2)
    parser.add_argument("--mc-samples", type=int, default=20)
    parser.add_argument("--partitions", type=int, default=20)
    parser.add_argument("--checkpoint", help="skip training: a synthetic.yaml checkpoint")
    parser.add_argument("--work", default="runs/trust_outcomes")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "trust_outcomes.json"))
    return parser.parse_args(argv)


def stages_of(rows: list[dict]) -> list[str]:
    return sorted((k.removeprefix("prob_cdr/") for k in rows[0] if k.startswith("prob_cdr/")), key=float)


def partitions(rows: list[dict], repeats: int) -> dict:
    rng = np.random.default_rng(0)
    stages = stages_of(rows)
    per: dict[str, list[float]] = {}
    for _ in range(repeats):
        order = rng.permutation(len(rows))
        cal, test = [rows[i] for i in order[: len(rows) // 2]], [rows[i] for i in order[len(rows) // 2:]]

        def column(group, key):
            return np.array([r[key] for r in group], np.float64)

        mmse = ConformalInterval.fit(column(cal, "mmse"), column(cal, "pred_mmse"), column(cal, "pred_mmse_sd"))
        truth = [stages.index(f"{r['cdr']:g}") for r in cal]
        cdr = OrdinalSet.fit(np.array([[r[f"prob_cdr/{s}"] for s in stages] for r in cal]), truth)
        for level in LEVELS:
            bounds = mmse.interval(column(test, "pred_mmse"), column(test, "pred_mmse_sd"), level)
            inside = (bounds[:, 0] <= column(test, "mmse")) & (column(test, "mmse") <= bounds[:, 1])
            per.setdefault(f"mmse_coverage_{level}", []).append(float(inside.mean()))
            sets = cdr.sets(np.array([[r[f"prob_cdr/{s}"] for s in stages] for r in test]), level)
            hit = [row[stages.index(f"{r['cdr']:g}")] for row, r in zip(sets, test)]
            per.setdefault(f"cdr_set_coverage_{level}", []).append(float(np.mean(hit)))
            if level == 0.9:
                per.setdefault("mmse_width_0.9", []).append(float((bounds[:, 1] - bounds[:, 0]).mean()))
                per.setdefault("cdr_set_size_0.9", []).append(float(sets.sum(1).mean()))
    return {k: {"mean": float(np.mean(v)), "sd": float(np.std(v)), "min": float(np.min(v)), "max": float(np.max(v))}
            for k, v in per.items()}


def main() -> None:
    args = parse_args()
    console = Console(width=180)
    work = Path(args.work)
    cfg = load_config(REPO / "configs" / "synthetic.yaml", [
        f"data.root={work / 'train_cohort'}", f"data.output={work / 'prepared'}", f"train.storage_path={work / 'runs'}",
        "train.name=trust_outcomes"])
    init_ray(cfg.ray)
    if args.checkpoint:
        checkpoint = Path(args.checkpoint)
    else:
        prepare_dataset(cfg)
        checkpoint = run_training(cfg, announce=console.print).best_dir
    s = cfg.data.synthetic
    cal = generate_cohort(work / f"cohort_{args.seed_cal}", args.subjects, args.seed_cal, s.shape, s.spacing)
    test = generate_cohort(work / f"cohort_{args.seed_test}", args.subjects, args.seed_test, s.shape, s.spacing)
    calibration, calibrated = calibrate(checkpoint, cal, work / "calibrated", mc_samples=args.mc_samples)
    with tempfile.TemporaryDirectory() as tmp:
        settings = {"mc_samples": args.mc_samples, "mc_mode": calibration.settings.mc_mode, "tta": True}
        plain = evaluate(checkpoint, test, Path(tmp) / "plain", **settings)
        honest = evaluate(calibrated, test, Path(tmp) / "calibrated", **settings)
        cal_rows = evaluate(calibrated, cal, Path(tmp) / "calibration_rows", **settings).rows
    m0, m1 = plain.metrics, honest.metrics
    keys = ["mmse_interval_coverage", "mmse_interval_width", "cdr_set_coverage", "cdr_set_size", "cdr_ece",
            "volume_interval_coverage/anterior", "volume_interval_coverage/posterior", "mmse_mae", "cdr_qwk",
            "c_index", "dice", "voxel_ece/foreground"]
    console.print(table(f"{args.subjects} test subjects (seed {args.seed_test}); calibrated on {args.subjects} "
                        f"(seed {args.seed_cal})", ["figure", "model (Monte Carlo)", "calibrated"],
                        [[k, f"{m0.get(k, float('nan')):.3f}", f"{m1.get(k, float('nan')):.3f}"] for k in keys]))
    risk = calibration.risk
    horizon = []
    if risk is not None:
        rows = honest.rows
        horizon = check_at_horizon([r["pred_risk_probability"] for r in rows], [r["time"] for r in rows],
                                   [r["event"] for r in rows], risk.horizon)
        console.print(table(f"Absolute risk by {risk.horizon:.2f} years (slope {risk.slope:.2f})",
                            ["cases", "mean predicted", "Kaplan–Meier observed"],
                            [[f"{g['cases']:.0f}", f"{g['predicted']:.3f}", f"{g['observed']:.3f}"] for g in horizon]))
    split = partitions(cal_rows + honest.rows, args.partitions)
    console.print(table(f"{args.partitions} random halves of the {len(cal_rows) + len(honest.rows)} held-out "
                        "subjects", ["figure", "mean", "SD", "min", "max"],
                        [[k, *(f"{v[s]:.3f}" for s in ("mean", "sd", "min", "max"))] for k, v in split.items()]))
    summary = {"checkpoint": str(checkpoint), "subjects": args.subjects, "mc_samples": args.mc_samples,
               "test": {"model": {k: m0.get(k) for k in keys}, "calibrated": {k: m1.get(k) for k in keys}},
               "risk": None if risk is None else {"horizon": risk.horizon, "slope": risk.slope, "groups": horizon},
               "partitions": split}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
