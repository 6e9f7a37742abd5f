"""Does joint learning pay on real images? Every variant on the real MSD hippocampus MRI, with outcomes
simulated from each case's true hippocampal volume (:mod:`jointray.data.semisynthetic`), against a
two-stage pipeline and an oracle fitted on the same cases.

Protocol (one run, one table):

1. **Cohort.** ``semisynthetic_manifest`` over every labelled MSD case (``--seed`` draws the covariates
   and outcomes). A seeded permutation of the sorted subject IDs holds out ``--test`` cases as the TEST
   set; the rest are the training cases (``--cases`` keeps only the first N of the permutation, for a
   quick check). ``train.csv`` and ``test.csv`` are rows of the one manifest. Only ``train.csv`` is
   prepared, so the test cases play no part in training or in choosing the checkpoint: jointray's own
   fold split (``train.fold`` of ``train.n_folds``, seeded by ``--seed``) takes the validation fold
   from the training cases, and the script checks that no test subject reached the shards.
2. **Training.** ``configs/msd_hippocampus.yaml`` (its preprocessing, model width, lr 2e-3, shift
   augmentation, bf16) with the data section pointed at ``train.csv`` (``data.format=manifest``, the
   clinical inputs of :data:`CLINICAL_COLUMNS`), and for every variant the same wall-clock budget
   (``--minutes``; ``train.epochs=1000``, no patience, so the budget ends each run and the schedule
   anneals by it), split, seed and loss settings; only ``model.*`` differs:

   * fixed loss weights ``seg 1.0, mmse 0.02, cdr 0.06, risk 0.06``. MMSE's Huber loss is in raw points,
     and with ``configs/synthetic.yaml``'s weights (``0.1, 0.3, 0.3``) the outcome losses' gradients held
     back the shared encoder's segmentation (v2's Dice below ``seg_only``'s); the heads need no large
     weight, since they are refit after training (``train.refit``). Chosen by the validation figures of
     three exploratory runs on ``--seed 0`` (benchmarks/README.md); for a single-task variant only the
     weights among its own tasks matter (Adam is scale-invariant);
   * no curriculum (the default): its phases halved the segmentation loss's share late in training;
   * variants: ``v2``; ``dv1``; ``seg_only``; ``outcome_only`` with the image; ``outcome_only`` with
     ``model.use_image=false`` (the clinical record alone).
3. **Test figures.** ``jointray.inference.evaluate`` of each best checkpoint on ``test.csv`` (test-time
   mirroring unless ``--no-tta``): mean and per-structure Dice, MMSE MAE and R², CDR QWK, Harrell's C.
4. **Baselines** on the same test cases, fitted on the training cases only. Features: the total
   hippocampal volume (mm³, the sum over structures: the outcome model is driven by it), age, female
   (sex one-hot, its reference level dropped), education_years and apoe4; a missing covariate takes the
   training mean; every feature is standardised by the training mean and SD. Then ordinary least squares
   for MMSE (clipped to 0–30), least squares on the CDR class (0–3) rounded and clipped for CDR, and
   lifelines' ``CoxPHFitter`` (penalizer 0.01) whose log partial hazard is the risk.

   * **two-stage**: ``seg_only``'s predicted volumes (``evaluate``'s ``volume/<structure>``), on the test
     cases and, to fit on, on the training cases (in-sample for the segmentation model, so its volumes
     there are cleaner than on test: the stage-2 fit sees less volume error than it meets). Its Dice and
     training time are ``seg_only``'s;
   * **oracle**: the same models on the true label volumes of ``truth.csv``;
   * **mean**: the training mean MMSE, the most common training CDR class and a constant risk (C = 0.5).

   Every row's figures, models' and baselines' alike, come from the same code,
   :func:`jointray.metrics.cohort.validation_metrics` (its C-index is lifelines' definition).

Prints the table and four verdicts — v2's MMSE MAE at most two-stage's, and within 25 % of the
oracle's; v2's C-index at least two-stage's; v2's Dice within 0.01 of ``seg_only``'s or better — and
writes JSON. Cohort, manifests, shards, runs and evaluations go under ``benchmarks/results/joint_real/``.

    python benchmarks/joint_real.py [--minutes 5] [--test 40] [--seed 0] [--variants v2,seg_only] [key=value ...]

MSD Task04 Hippocampus: Simpson et al., arXiv:1902.09063, CC-BY-SA 4.0.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")

import torch
from lifelines import CoxPHFitter
from rich.console import Console
from rich.table import Table

from jointray.config import load_config, override_text
from jointray.data.prepare import prepare_dataset
from jointray.data.semisynthetic import CLINICAL_COLUMNS, oracle_features, semisynthetic_manifest
from jointray.data.streaming import split_subjects
from jointray.inference.evaluate import CASES_FILE, evaluate
from jointray.losses.ordinal import cdr_to_class
from jointray.metrics.cohort import validation_metrics
from jointray.runtime import init_ray
from jointray.train.trainer import run_training

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "joint_real"
SETTINGS = [  # every variant: fixed loss weights (module docstring), no curriculum
    "train.balancer.kind=fixed", override_text("train.balancer.weights", {"seg": 1.0, "mmse": 0.02, "cdr": 0.06,
                                                                          "risk": 0.06}),
    "train.curriculum.enabled=false",
]
VARIANTS = {  # --variants key: (table row, overrides)
    "v2": ("v2", ["model.variant=v2"]),
    "dv1": ("dv1", ["model.variant=dv1"]),
    "seg_only": ("seg_only", ["model.variant=seg_only"]),
    "outcome_only": ("outcome_only (image)", ["model.variant=outcome_only"]),
    "clinical_only": ("outcome_only (clinical)", ["model.variant=outcome_only", "model.use_image=false"]),
}
COLUMNS = {"dice": "Dice", "dice/anterior": "Dice anterior", "dice/posterior": "Dice posterior",
           "mmse_mae": "MMSE MAE", "mmse_r2": "MMSE R²", "cdr_qwk": "CDR QWK", "c_index": "C-index",
           "train_minutes": "train min"}
CDR_CLASSES = 4


def split_cohort(manifest: Path, n_test: int, seed: int, n_cases: int | None,
                 folder: Path) -> tuple[Path, Path, list[str]]:
    """(train.csv, test.csv, test IDs): a seeded permutation of the sorted IDs, cut to ``n_cases``; its
    first ``n_test`` are the test set."""
    table = pd.read_csv(manifest, dtype=str, keep_default_na=False)  # text in, text out: cells stay as written
    ids = sorted(table["subject_id"])
    order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))][:n_cases]
    if not 0 < n_test < len(order) - 1:
        raise SystemExit(f"--test {n_test} must leave training cases: the cohort has {len(order)}")
    test = set(order[:n_test])
    keep = table["subject_id"].isin(order)
    paths = folder / "train.csv", folder / "test.csv"
    table[keep & ~table["subject_id"].isin(test)].to_csv(paths[0], index=False)
    table[table["subject_id"].isin(test)].to_csv(paths[1], index=False)
    return *paths, sorted(test)


def figures(metrics: dict[str, float]) -> dict[str, float]:
    return {k: float(metrics.get(k, math.nan)) for k in COLUMNS if k != "train_minutes"}


def score(rows: list[dict], targets: pd.DataFrame) -> dict[str, float]:
    """Baseline figures through the models' own metric code, from rows shaped like evaluate's (no masks:
    the segmentation metrics are left out)."""
    for row, (_, t) in zip(rows, targets.iterrows()):
        row |= {"has_label": False, **{k: float(t[k]) for k in ("mmse", "cdr", "time", "event")}}
    metrics = validation_metrics(rows, {1: "anterior", 2: "posterior"}, CDR_CLASSES)
    return figures({k.removeprefix("val/"): v for k, v in metrics.items()})


def design(train: pd.DataFrame, test: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Standardised features (module docstring), with the training cases' means and SDs for both."""
    def raw(t: pd.DataFrame) -> pd.DataFrame:
        return pd.DataFrame({"volume": t["volume"], "age": t["age"], "female": (t["sex"] == "F").astype(float),
                             "education_years": t["education_years"], "apoe4": t["apoe4"]}, dtype=float)
    x_train, x_test = raw(train), raw(test)
    mean, sd = x_train.mean(), x_train.std().replace(0.0, 1.0)
    return (x_train.fillna(mean) - mean) / sd, (x_test.fillna(mean) - mean) / sd


def fitted_baseline(train: pd.DataFrame, test: pd.DataFrame) -> dict[str, float]:
    """OLS for MMSE, rounded least squares for the CDR class, Cox for risk; ``volume`` is the volume column."""
    x_train, x_test = design(train, test)
    a_train, a_test = np.c_[np.ones(len(x_train)), x_train], np.c_[np.ones(len(x_test)), x_test]
    mmse = a_test @ np.linalg.lstsq(a_train, train["mmse"].to_numpy(float), rcond=None)[0]
    cdr_class = cdr_to_class(torch.tensor(train["cdr"].to_numpy(float)), CDR_CLASSES).numpy()
    cdr = np.clip(np.rint(a_test @ np.linalg.lstsq(a_train, cdr_class, rcond=None)[0]), 0, CDR_CLASSES - 1)
    survival = x_train.assign(time=train["time"].to_numpy(), event=train["event"].to_numpy())
    cox = CoxPHFitter(penalizer=0.01).fit(survival, duration_col="time", event_col="event")
    risk = cox.predict_log_partial_hazard(x_test).to_numpy()
    rows = [{"pred_mmse": float(np.clip(m, 0, 30)), "pred_cdr": int(c), "pred_risk": float(r)}
            for m, c, r in zip(mmse, cdr, risk)]
    return score(rows, test)


def mean_baseline(train: pd.DataFrame, test: pd.DataFrame) -> dict[str, float]:
    mode = int(np.bincount(cdr_to_class(torch.tensor(train["cdr"].to_numpy(float)), CDR_CLASSES).numpy()).argmax())
    rows = [{"pred_mmse": float(train["mmse"].mean()), "pred_cdr": mode, "pred_risk": 0.0} for _ in range(len(test))]
    return score(rows, test)


def predicted_volumes(table: pd.DataFrame, cases_csv: Path, structures: list[str]) -> pd.DataFrame:
    """``table`` with ``volume`` = the predicted total volume of its cases (cases evaluate could not read dropped)."""
    cases = pd.read_csv(cases_csv, dtype={"subject_id": str})
    cases["volume"] = cases[[f"volume/{name}" for name in structures]].sum(axis=1)
    return table.merge(cases[["subject_id", "volume"]], on="subject_id", how="inner", validate="one_to_one")


def _fmt(value: float | None, digits: int = 4) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=str(REPO.parent / "shared" / "data" / "msd_hippocampus"))
    parser.add_argument("--minutes", type=float, default=5.0, help="train.max_minutes of every variant")
    parser.add_argument("--test", type=int, default=40, help="cases held out as the test set")
    parser.add_argument("--seed", type=int, default=0, help="cohort outcomes, test draw and train.seed")
    parser.add_argument("--cases", type=int, help="use only this many cases, test included (a quick check)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {list(VARIANTS)}")
    parser.add_argument("--no-tta", action="store_true", help="evaluate without test-time mirroring")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "joint_real.json"))
    parser.add_argument("overrides", nargs="*", help="dotted config overrides for every variant")
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    console = Console(width=180)

    cohort = semisynthetic_manifest(Path(args.root), OUT / "cohort", seed=args.seed)
    train_csv, test_csv, test_ids = split_cohort(cohort.manifest, args.test, args.seed, args.cases, OUT)
    base = ["data.format=manifest", f"data.root={train_csv}", f"data.output={OUT / 'prepared'}",
            override_text("data.clinical_columns", CLINICAL_COLUMNS), f"train.storage_path={OUT / 'runs'}",
            f"train.max_minutes={args.minutes}", "train.epochs=1000", "train.patience=null", f"train.seed={args.seed}",
            *SETTINGS]
    cfg = load_config("msd_hippocampus", [*base, *args.overrides])
    structures = [name for label, name in cfg.data.label_names.items() if label != 0]
    init_ray(cfg.ray)
    prepared = prepare_dataset(cfg)
    train_ids, val_ids = split_subjects(cfg.data.output, cfg.train.n_folds, cfg.train.fold, cfg.train.seed)
    assert not set(train_ids + val_ids) & set(test_ids), "a test subject reached the training shards"
    console.print(f"cohort of {cohort.n_cases} cases ({len(cohort.skipped)} skipped): {len(test_ids)} test; "
                  f"{prepared.prepared} prepared for training ({len(prepared.quarantined)} quarantined), fold "
                  f"{cfg.train.fold} of {cfg.train.n_folds}: {len(train_ids)} train, {len(val_ids)} validation")

    results, runs, seg_cases = {}, {}, None
    for key in variants:
        label, extra = VARIANTS[key]
        run_cfg = load_config("msd_hippocampus", [*base, *extra, f"train.name=joint_real_{key}", *args.overrides])
        console.rule(label)
        started = time.perf_counter()
        trained = run_training(run_cfg, announce=console.print)
        minutes = (time.perf_counter() - started) / 60
        shutil.rmtree(OUT / "eval" / key, ignore_errors=True)
        report = evaluate(trained.best_dir, test_csv, OUT / "eval" / key / "test", tta=not args.no_tta)
        results[label] = figures(report.metrics) | {"train_minutes": minutes}
        m, final = trained.metrics, trained.final_metrics
        runs[label] = {"best_checkpoint": str(trained.best_dir), "test_cases_predicted": report.predicted,
                       "test_quarantined": len(report.quarantined), "best_epoch": int(m["epoch"]),
                       "epochs_run": int(final.get("epoch", m["epoch"])) + 1,
                       "loop_minutes": final.get("elapsed_s", math.nan) / 60,
                       "validation": {k: v for k, v in m.items() if k.startswith("val/")},
                       "test_metrics": report.metrics}
        if key == "seg_only":  # the two-stage pipeline needs its volumes on the training cases too
            evaluate(trained.best_dir, train_csv, OUT / "eval" / key / "train", tta=not args.no_tta)
            seg_cases = {part: OUT / "eval" / key / part / CASES_FILE for part in ("train", "test")}

    train_tab = oracle_features(cohort.truth, train_csv)
    test_tab = oracle_features(cohort.truth, test_csv)
    if seg_cases is not None:
        two_stage = fitted_baseline(predicted_volumes(train_tab, seg_cases["train"], structures),
                                    predicted_volumes(test_tab, seg_cases["test"], structures))
        seg = results["seg_only"]
        results["two-stage"] = two_stage | {k: seg[k] for k in ("dice", "dice/anterior", "dice/posterior",
                                                                "train_minutes")}
    else:
        console.print("[yellow]no seg_only run: no two-stage baseline[/yellow]")
    results["oracle"] = fitted_baseline(train_tab.rename(columns={"volume_total_mm3": "volume"}),
                                        test_tab.rename(columns={"volume_total_mm3": "volume"}))
    results["mean"] = mean_baseline(train_tab, test_tab)

    table = Table(title=f"joint learning on real MSD hippocampus MRI with semi-synthetic outcomes (seed {args.seed}): "
                        f"{len(test_ids)} held-out test cases; {args.minutes:g} min of training each on "
                        f"{len(train_ids) + len(val_ids)} cases (fold {cfg.train.fold} of {cfg.train.n_folds} "
                        f"validates)")
    for column in ("row", *COLUMNS.values()):
        table.add_column(column, justify="right")
    for label, r in results.items():
        table.add_row(label, *(_fmt(r.get(k, math.nan), 1 if k == "train_minutes" else 4) for k in COLUMNS))
    console.print(table)

    def get(row: str, key: str) -> float:
        return results.get(row, {}).get(key, math.nan)

    def verdict(value: float, bound: float, ok) -> bool | None:
        return None if math.isnan(value) or math.isnan(bound) else bool(ok(value, bound))

    verdicts = {
        "v2_mmse_mae_at_most_two_stage": verdict(get("v2", "mmse_mae"), get("two-stage", "mmse_mae"),
                                                 lambda a, b: a <= b),
        "v2_mmse_mae_within_25pct_of_oracle": verdict(get("v2", "mmse_mae"), get("oracle", "mmse_mae"),
                                                      lambda a, b: a <= 1.25 * b),
        "v2_c_index_at_least_two_stage": verdict(get("v2", "c_index"), get("two-stage", "c_index"),
                                                 lambda a, b: a >= b),
        "v2_dice_within_0.01_of_seg_only": verdict(get("v2", "dice"), get("seg_only", "dice"),
                                                   lambda a, b: a >= b - 0.01),
    }
    console.print(f"v2 MMSE MAE {_fmt(get('v2', 'mmse_mae'))} vs two-stage {_fmt(get('two-stage', 'mmse_mae'))} vs "
                  f"oracle {_fmt(get('oracle', 'mmse_mae'))} "
                  f"(v2/oracle {get('v2', 'mmse_mae') / get('oracle', 'mmse_mae'):.2f}); "
                  f"v2 C-index {_fmt(get('v2', 'c_index'))} vs two-stage {_fmt(get('two-stage', 'c_index'))}; "
                  f"v2 Dice {_fmt(get('v2', 'dice'))} vs seg_only {_fmt(get('seg_only', 'dice'))}")
    console.print(verdicts)

    def finite(value):
        if isinstance(value, dict):
            return {k: finite(v) for k, v in value.items()}
        return None if isinstance(value, float) and not math.isfinite(value) else value

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(finite({
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "minutes": args.minutes, "seed": args.seed, "tta": not args.no_tta, "overrides": args.overrides,
        "cohort": {"cases": cohort.n_cases, "skipped": [q.subject_id for q in cohort.skipped],
                   "prepared": prepared.prepared, "quarantined": [q.subject_id for q in prepared.quarantined],
                   "train": len(train_ids), "validation": len(val_ids), "test": len(test_ids),
                   "test_subjects": test_ids},
        "rows": results, "runs": runs, "verdicts": verdicts,
    }), indent=2) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
