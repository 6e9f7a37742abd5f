"""The ``jointray`` command line: one typed config, dotted overrides, rich output."""

from __future__ import annotations

import logging
import math
import os
from contextlib import contextmanager
from pathlib import Path

# Ray Data's per-operator progress bars, redrawn by every training worker and by Ray Train's split
# coordinator, bury the one line per epoch that a person reads. Ray Data reads this when it is first
# imported and ships the driver's DataContext to every task, so it must be set before that import.
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
# Ray Train's print patch would send each epoch line twice (stdout and its log) on a local instance,
# whose processes inherit this environment.
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")

import typer
from rich.console import Console
from rich.table import Table

import jointray
from jointray import builtin_configs
from jointray.config import Config, ConfigError, load_config, override_text
from jointray.preflight import check_checkpoint, check_evaluate, check_prepare, check_train

app = typer.Typer(no_args_is_help=True, add_completion=False)
console = Console()

#: How many quarantined inputs the terminal shows; the JSON report always has all of them.
SHOWN_QUARANTINE_ROWS = 20
CONFIG_HELP = f"YAML config file, or a built-in config by name: {', '.join(builtin_configs.names())}"
#: The real DICOM study the demo sends, from the shared data beside the source checkout (absent from an
#: installed wheel: then the demo sends the synthetic case only).
DEMO_DICOM = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dicom_hippocrop" / "study1"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"jointray {jointray.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    _version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                  help="print jointray's version and exit"),
) -> None:
    """jointray: joint segmentation and clinical outcome learning for 3D medical imaging on Ray."""


@contextmanager
def _usage_errors(*kinds: type[Exception]):
    """A request that cannot run (bad config, missing data or checkpoint) ends the command with its
    message and exit code 2, not a traceback."""
    try:
        yield
    except (ConfigError, *kinds) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


ADDRESS_HELP = ("an existing Ray cluster: ray://HOST:10001, HOST:6379 or auto (default: $RAY_ADDRESS, else a "
                "local instance)")


def _address(address: str | None) -> list[str]:
    """``--address`` as the override it is (``ray.address``): the config that travels with the run says where."""
    return [f"ray.address={address}"] if address else []


def _config(path: str | None, overrides: list[str] | None) -> Config:
    with _usage_errors():
        return load_config(path, overrides or [])


def _print_prepare_report(report) -> None:
    summary = Table(title="jointray prepare", show_header=False)
    summary.add_row("inputs", str(report.inputs))
    summary.add_row("prepared", f"[green]{report.prepared}[/green]")
    summary.add_row("quarantined", f"[yellow]{len(report.quarantined)}[/yellow]")
    summary.add_row("warnings", str(len(report.warnings)))
    summary.add_row("clinical features", report.clinical_features)
    summary.add_row("output", report.output)
    summary.add_row("spec digest", report.spec_digest)
    summary.add_row("time", f"{report.elapsed_s:.1f} s")
    console.print(summary)
    if report.quarantined:
        table = Table(title="quarantined")
        for column in ("subject", "stage", "path", "reason"):
            table.add_column(column, overflow="fold")
        for q in report.quarantined[:SHOWN_QUARANTINE_ROWS]:
            table.add_row(q.subject_id or "", q.stage, q.path, q.reason)
        console.print(table)
        hidden = len(report.quarantined) - SHOWN_QUARANTINE_ROWS
        if hidden > 0:
            console.print(f"... and {hidden} more in {report.output}/report.json")
    for warning in report.warnings[:SHOWN_QUARANTINE_ROWS]:
        console.print(f"[yellow]warning[/yellow] {warning['subject_id']}: {warning['message']}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def prepare(
    config: str = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    overrides: list[str] = typer.Argument(None, help="dotted overrides, e.g. data.root=../data"),
    strict: bool = typer.Option(False, help="exit non-zero if any input is quarantined"),
    address: str = typer.Option(None, "--address", help=ADDRESS_HELP),
) -> None:
    """Validate and preprocess a dataset into Parquet shards, a PreprocessSpec and a quarantine report."""
    cfg = _config(config, [*(overrides or []), *_address(address)])
    with _usage_errors():
        check_prepare(cfg)
    # These take seconds to import (Ray, torch, MONAI): after the checks, so that a typo fails at once.
    from jointray.data.prepare import prepare_dataset
    from jointray.runtime import init_ray

    init_ray(cfg.ray)
    with _usage_errors():
        report = prepare_dataset(cfg)
    _print_prepare_report(report)
    if report.prepared == 0:
        console.print("[red]error:[/red] nothing usable remains; see the report")
        raise typer.Exit(1)
    if strict and report.quarantined:
        console.print(f"[red]error:[/red] --strict and {len(report.quarantined)} input(s) quarantined")
        raise typer.Exit(1)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(
    config: str = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    all_folds: bool = typer.Option(False, "--all-folds", help="cross-validation: train every fold (train.folds "
                                   "lists some) and write their ensemble, <storage_path>/<name>/ensemble.json"),
    overrides: list[str] = typer.Argument(None, help="dotted overrides, e.g. train.epochs=5"),
    address: str = typer.Option(None, "--address", help=ADDRESS_HELP),
) -> None:
    """Train the joint model on Ray Train from prepared shards; prints where the best checkpoint (or the
    cross-validation's ensemble) is."""
    cfg = _config(config, [*(overrides or []), *_address(address)])
    if all_folds:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"folds": list(range(cfg.train.n_folds))})})
    with _usage_errors():
        check_train(cfg)
    # These take seconds to import (Ray, torch, MONAI): after the checks, so that a typo fails at once.
    from jointray.runtime import init_ray
    from jointray.train.progress import summary_table
    from jointray.train.trainer import TrainingDiverged, run_training

    init_ray(cfg.ray)
    if cfg.train.folds is None:
        with _usage_errors(TrainingDiverged):
            result = run_training(cfg, announce=console.print)
        console.print(summary_table(result.metrics, f"jointray train: {cfg.train.name} (best checkpoint)"))
        console.print(f"best checkpoint: {result.best_dir}")
        return
    from jointray.train.folds import run_cross_validation

    with _usage_errors(TrainingDiverged):
        folds = run_cross_validation(cfg, announce=console.print)
    for k, result in sorted(folds.folds.items()):
        console.print(summary_table(result.metrics, f"fold {k}: {result.best_dir}"))
    console.print(summary_table({f"val/{k}": v for k, v in folds.out_of_fold.items()},
                                f"jointray train: {cfg.train.name}, out-of-fold "
                                "(each fold's own validation cases)"))
    kept = ", ".join(folds.largest_component) or "none"
    console.print(f"largest connected component kept for: {kept}")
    console.print(f"ensemble of {len(folds.folds)} folds: {folds.ensemble_dir}")


def _print_search(summary) -> None:
    """The top trials, best first, and where the search's outputs are."""
    table = summary.table
    (first, mode), = list(summary.objectives.items())[:1]
    ranked = table.assign(_failed=table["status"] != "COMPLETE").sort_values(
        ["_failed", first], ascending=[True, mode == "min"], na_position="last")
    params = [c for c in table.columns if c.startswith("param/")]
    view = Table(title=f"jointray tune: {str(summary.where).rstrip('/').rpartition('/')[2]} ({len(table)} trials, "
                       f"{int((table['status'] == 'COMPLETE').sum())} complete)")
    # Column heads: the key's last two parts (phases.2.cross, weights.mmse), which name it in a narrow terminal.
    for column in ["trial", "status", *(".".join(p.removeprefix("param/").split(".")[-2:]) for p in params), *summary.objectives,
                   "epochs", "min", "pareto"]:
        view.add_column(column, justify="left" if column in ("trial", "status") else "right", overflow="fold")
    for _, row in ranked.head(10).iterrows():
        cells = [row["trial_id"], row["status"]]
        cells += [f"{row[p]:.4g}" if isinstance(row[p], float) else str(row[p]) for p in params]
        cells += [f"{row[k]:.4f}" if not math.isnan(row[k]) else "-" for k in summary.objectives]
        cells += [f"{row['epochs']:.0f}" if not math.isnan(row["epochs"]) else "-",
                  f"{row['time_s'] / 60:.1f}" if not math.isnan(row["time_s"]) else "-", "*" if row["pareto"] else ""]
        view.add_row(*cells)
    console.print(view)
    for _, row in table[table["error"] != ""].iterrows():
        console.print(f"[red]trial {row['trial_id']} failed:[/red] {row['error']}")
    if str(summary.where) != str(summary.folder):
        console.print(f"search folder: {summary.where} (this machine's copy of its files: {summary.folder})")
    console.print(f"results: {summary.folder / 'results.csv'}")
    if summary.plot is not None:
        console.print(f"plot: {summary.plot}")
    if summary.best_dir is not None:
        console.print(f"best trial {summary.best_trial}: checkpoint {summary.best_dir}, config {summary.best_config}")
    else:
        console.print("[yellow]no trial completed: no best checkpoint[/yellow]")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def tune(
    config: str = typer.Option(None, "--config", "-c", help=CONFIG_HELP + " (with a tune section)"),
    overrides: list[str] = typer.Argument(None, help="dotted overrides, e.g. tune.num_samples=8"),
    resume: str = typer.Option(None, "--resume", help="continue the search in this folder (runs/<tune.name>) or "
                               "storage URI with the config it started with"),
    address: str = typer.Option(None, "--address", help=ADDRESS_HELP),
) -> None:
    """Search training hyperparameters with Ray Tune and Optuna; exports the best trial's checkpoint and config."""
    if resume is not None and (config or overrides):
        console.print("[red]error:[/red] --resume continues a search with the config it was started with: "
                      "give no --config or overrides")
        raise typer.Exit(2)
    from jointray.tune.search import load_search, run_search  # Ray and torch: seconds to import

    with _usage_errors():
        cfg = load_search(resume) if resume is not None else load_config(config, overrides or [])
        check_train(cfg)
    from jointray.runtime import init_ray

    init_ray(cfg.ray.model_copy(update={"address": address}) if address else cfg.ray)
    with _usage_errors():
        summary = run_search(cfg, resume=resume is not None)
    _print_search(summary)


def _print_evaluation(report) -> None:
    summary = Table(title=f"jointray evaluate: {report.checkpoint}", show_header=False)
    summary.add_row("inputs", str(report.inputs))
    summary.add_row("predicted", f"[green]{report.predicted}[/green]")
    summary.add_row("quarantined", f"[yellow]{len(report.quarantined)}[/yellow]")
    for key, value in report.metrics.items():
        summary.add_row(key, "n/a" if math.isnan(value) else f"{value:.4f}")
    summary.add_row("time", f"{report.elapsed_s:.1f} s")
    console.print(summary)
    for q in report.quarantined[:SHOWN_QUARANTINE_ROWS]:
        console.print(f"[yellow]quarantined[/yellow] {q.path}: {q.reason}")
    console.print(f"masks: {Path(report.out) / 'masks'}\nper-case table: {Path(report.out) / 'cases.csv'}\n"
                  f"summary: {Path(report.out) / 'summary.json'}")


@app.command()
def evaluate(
    checkpoint: list[str] = typer.Option(..., "--checkpoint", help="checkpoint folder (runs/<name>/best), exported "
                                         "model or ensemble (runs/<name> after --all-folds), or its storage URI; "
                                         "repeat it to average several models"),
    data: Path = typer.Option(..., "--data", help="MSD folder, manifest CSV/Parquet, NIfTI folder or DICOM series"),
    out: Path = typer.Option(..., "--out", help="output folder: masks/, cases.csv, summary.json"),
    labels: Path = typer.Option(None, "--labels", help="for a NIfTI folder: reference labels under the same names"),
    workers: int = typer.Option(None, "--workers", min=1, help="Ray Data actors, at least 1 (default: one per CPU "
                                "of the Ray cluster); never more than its CPUs or the cases"),
    batch_size: int = typer.Option(2, "--batch-size", min=1),
    tta: bool = typer.Option(None, "--tta/--no-tta", help="test-time mirroring along the axes training mirrored "
                             "(default: on, or as a calibrated model was calibrated)"),
    mc_samples: int = typer.Option(None, "--mc-samples", min=1, help="Monte Carlo dropout samples per case: per-case "
                                   "intervals (volumes, MMSE, risk) and their coverage (default: 1, or as a "
                                   "calibrated model was calibrated)"),
    mc_mode: str = typer.Option(None, "--mc-mode", help="full, decoder or heads (default: the config's "
                                "inference.mc_mode, or a calibrated model's)"),
    address: str = typer.Option(None, "--address", help=ADDRESS_HELP),
) -> None:
    """Run a model over a dataset on Ray Data: masks in each input's own space, per-case CSV, JSON summary."""
    with _usage_errors():
        for folder in checkpoint:
            check_evaluate(folder, data, labels)
    # These take seconds to import (Ray, torch, MONAI): after the checks, so that a typo fails at once.
    from jointray.artifacts import CheckpointError, read_config
    from jointray.config import RayConfig
    from jointray.inference.evaluate import evaluate as run_evaluation
    from jointray.runtime import init_ray

    with _usage_errors(CheckpointError):
        for folder in checkpoint:
            read_config(folder)  # a folder that is not a model (a single run's runs/<name>, say) fails here
    init_ray(RayConfig(address=address))
    with _usage_errors(CheckpointError):
        report = run_evaluation(checkpoint, data, out, labels=labels, workers=workers, batch_size=batch_size,
                                tta=tta, mc_samples=mc_samples, mc_mode=mc_mode)
    _print_evaluation(report)
    if report.predicted == 0:
        console.print("[red]error:[/red] no input could be predicted; see the summary")
        raise typer.Exit(1)


@app.command()
def calibrate(
    checkpoint: str = typer.Option(..., "--checkpoint", help="checkpoint, exported model or ensemble to calibrate"),
    data: Path = typer.Option(..., "--data", help="labelled calibration cases (MSD folder, manifest, ...): "
                              "disjoint from the cases that trained the model and chose its checkpoint"),
    out: Path = typer.Option(..., "--out", help="the calibrated model: a folder with ensemble.json"),
    labels: Path = typer.Option(None, "--labels", help="for a NIfTI folder: reference labels under the same names"),
    level: float = typer.Option(0.9, "--level", min=0.5, max=0.99, help="coverage of the intervals"),
    failure_dice: float = typer.Option(0.8, "--failure-dice", min=0.0, max=1.0,
                                       help="a case fails when a structure's Dice is below this"),
    review_alpha: float = typer.Option(0.05, "--review-alpha", min=0.001, max=0.5,
                                       help="bound on the chance that a case fails and is not flagged"),
    ood_alpha: float = typer.Option(0.02, "--ood-alpha", min=0.001, max=0.5,
                                    help="bound on the chance that a case like the calibration cases is flagged "
                                    "as out of distribution"),
    scaling: str = typer.Option("auto", "--scaling", help="voxel probability scaling: auto (by held-out NLL), none, "
                                "temperature, class_temperature or vector"),
    tta: bool = typer.Option(True, "--tta/--no-tta", help="test-time mirroring, as it will be served"),
    mc_samples: int = typer.Option(1, "--mc-samples", min=1, help="Monte Carlo samples, as they will be served "
                                   "(1: mirroring alone calibrated as well, with narrower intervals, at half the "
                                   "cost on MSD; benchmarks/README.md, Trust)"),
    mc_mode: str = typer.Option(None, "--mc-mode", help="full, decoder or heads (default: the config's)"),
    workers: int = typer.Option(None, "--workers", min=1, help="Ray Data actors (default: one per CPU)"),
    address: str = typer.Option(None, "--address", help=ADDRESS_HELP),
) -> None:
    """Fit calibrated probabilities, conformal intervals, a risk-controlled review flag and an
    out-of-distribution test on held-back cases; write the calibrated model."""
    with _usage_errors():
        check_evaluate(checkpoint, data, labels)
    from jointray.artifacts import CheckpointError
    from jointray.config import RayConfig
    from jointray.inference.calibrate import calibrate as run_calibration
    from jointray.runtime import init_ray

    init_ray(RayConfig(address=address))
    with _usage_errors(CheckpointError):
        calibration, folder = run_calibration(checkpoint, data, out, level, failure_dice, review_alpha, ood_alpha,
                                              scaling, tta, mc_samples, mc_mode, workers, labels)
    table = Table(title=f"jointray calibrate: {calibration.cases} cases of {data}", show_header=False)
    mask = "the calibrated argmax" if calibration.mask_calibrated else "unchanged"
    table.add_row("voxel scaling", f"{calibration.scaling_method} (mask {mask})")
    for key, value in calibration.fit_metrics.items():
        table.add_row(key, f"{value:.4f}")
    table.add_row("intervals", ", ".join([*calibration.volume, *(["mmse"] if calibration.mmse else []),
                                          *(["cdr set"] if calibration.cdr else [])]) or "none")
    table.add_row("review threshold", f"predicted Dice < {calibration.review_threshold:.3f}")
    console.print(table)
    console.print(calibration.coverage_sentence())
    console.print(calibration.review_sentence())
    console.print(f"calibrated model: {folder}")


@app.command()
def report(
    evaluation: list[Path] = typer.Option(..., "--evaluation", help="an `evaluate` output folder; repeat it to compare "
                                          "models on the same cases (the first is the reference)"),
    out: Path = typer.Option(None, "--out", help="the HTML file (default: <first evaluation>/report.html); its "
                             "figures go to <name>_figures/ beside it, its numbers to <name>.json"),
    name: list[str] = typer.Option(None, "--name", help="a label per evaluation, in order (default: folder names)"),
) -> None:
    """Write one self-contained HTML report (figures embedded, opens offline) from evaluate outputs."""
    from jointray.report.evaluation import build_report

    out = out or evaluation[0] / "report.html"
    with _usage_errors(FileNotFoundError, ValueError):
        document = build_report(evaluation, out, name or None)
    console.print(f"report: [bold]{out}[/bold] ({len(document.sections)} sections, {len(document.figures)} figures "
                  f"in {out.parent / (out.stem + '_figures')})")


@app.command()
def export(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="training checkpoint folder, e.g. runs/<name>/best"),
    out: Path = typer.Option(..., "--out", help="folder for the serving artifact (replaced whole)"),
    format: str = typer.Option("torch", "--format", help="torch (state dict), onnx (onnxruntime) or torchscript"),
    quantize: str = typer.Option(None, "--quantize", help="int8: static post-training quantisation (onnx only)"),
    prune: float = typer.Option(None, "--prune", help="fraction of weights to zero by magnitude, then fine-tune"),
    finetune_steps: int = typer.Option(100, "--finetune-steps", help="fine-tuning steps after pruning"),
    calibration_cases: int = typer.Option(16, "--calibration-cases", help="prepared training cases for INT8 ranges"),
    prepared: Path = typer.Option(None, "--prepared", help="prepared shards to check, calibrate and fine-tune on "
                                  "(default: the checkpoint's data.output)"),
) -> None:
    """Write a serving artifact: the model (model.pt, or model.onnx / model.ts and their Monte Carlo twins),
    config.yaml, spec.json, schema.json, metrics.json, export.json (how it was made, its distance from PyTorch)."""
    from jointray.artifacts import CheckpointError, load_model
    from jointray.export.exporter import ExportError, ExportSettings, export_model

    settings = ExportSettings(format=format, quantize=quantize, prune=prune, finetune_steps=finetune_steps,
                              calibration_cases=calibration_cases, prepared=prepared)
    with _usage_errors(CheckpointError, ExportError):
        export_model(checkpoint, out, settings)
        model = load_model(out)
    console.print(f"exported {model.config.model.variant} (version {model.version}, runtime {model.runtime}, trained "
                  f"heads {model.trained_heads or 'none'}) to {out}")
    figures = model.export.get("fidelity", {})
    if figures:
        console.print("against PyTorch on {:.0f} validation cases: probabilities within {:.2e}, masks' Dice {:.4f}"
                      .format(figures["cases"], figures.get("max_abs_probability_difference", float("nan")),
                              figures.get("mask_dice_vs_torch", float("nan"))))
    for kind in ("deterministic", "mc"):
        quantized = model.export.get(f"quantization_{kind}")
        if quantized:
            console.print(f"INT8 ({kind} graph): {quantized['int8_layers']}; "
                          f"left in float: {quantized['float_layers']}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve(
    checkpoint: str = typer.Option(..., "--checkpoint", help="runs/<name>/best as it is, or an exported model; a "
                                   "folder or a storage URI (s3://bucket/runs/<name>/best)"),
    overrides: list[str] = typer.Argument(None, help="serve.* / inference.* overrides, e.g. serve.max_batch_size=16"),
    host: str = typer.Option(None, "--host", help="bind address (default serve.host, 127.0.0.1)"),
    port: int = typer.Option(None, "--port", help="HTTP port (default serve.port, 8000)"),
    address: str = typer.Option(None, "--address", help=ADDRESS_HELP),
) -> None:
    """Serve a model over HTTP on Ray Serve until interrupted (Ctrl-C shuts it down cleanly)."""
    import signal
    import time

    with _usage_errors():
        check_checkpoint(checkpoint)
    # These take seconds to import (Ray, torch, MONAI): after the check, so that a typo fails at once.
    from jointray.artifacts import CheckpointError
    from jointray.config import RayConfig
    from jointray.runtime import init_ray
    from jointray.serve.app import serving_config, start
    from jointray.storage import redact

    extra = list(overrides or []) + ([f"serve.host={host}"] if host else []) + ([f"serve.port={port}"] if port else [])
    with _usage_errors(CheckpointError):
        serving_config(checkpoint, extra)  # a bad checkpoint or override fails before Ray starts
    init_ray(RayConfig(address=address))
    from ray import serve as ray_serve

    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # our own lines say where and when it serves
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    try:
        url = start(checkpoint, extra)
        console.print(f"serving {redact(checkpoint)} at [bold]{url}[/bold] (viewer {url}/, API {url}/docs); "
                      "Ctrl-C stops")
        while not stop:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        console.print("shutting down")
        ray_serve.shutdown()


def _bounds(interval: list[float | None], digits: int) -> str:
    """An answer's interval; a bound is null (infinite) where too few calibration cases back the level."""
    low, high = (("−∞", "∞")[i] if v is None else f"{v:.{digits}f}" for i, v in enumerate(interval))
    return f"{low}–{high}"


def _print_predictions(answers: list[tuple[str, dict]]) -> None:
    table = Table(title="jointray predict")
    for column in ("input", "path", "structure volumes mm³ (mean ± sd, interval)", "outcomes", "review"):
        table.add_column(column, overflow="fold")
    for name, body in answers:
        if "error" in body:
            table.add_row(name, "", f"[red]{body['error']['message']}[/red]", "", "")
            continue
        level = f"{body['mc']['interval']:.0%}"
        volumes = "\n".join(f"{s}: {v['volume_mm3']['mask']:.0f} ({v['volume_mm3']['mean']:.0f} ± "
                             f"{v['volume_mm3']['std']:.0f}, {level} {_bounds(v['volume_mm3']['interval'], 0)})"
                             for s, v in body["structures"].items())
        outcomes = []
        for key, value in body["outcomes"].items():
            if key == "cdr":
                chosen = f"; set {{{', '.join(value['set'])}}}" if value.get("set") else ""
                outcomes.append(f"CDR {value['stage']:g} (" + ", ".join(
                    f"{stage}: {p:.2f}" for stage, p in value["probabilities"].items()) + chosen + ")")
            elif key == "risk_by_horizon":
                outcomes.append(f"event by {value['horizon']:.3g}: {value['probability']:.0%}")
            else:
                outcomes.append(f"{key.upper()} {value['mean']:.2f} ± {value['std']:.2f} ({level} "
                                f"{_bounds(value['interval'], 2)})")
        review = "[yellow]review[/yellow]: " + "; ".join(body["review"]["reasons"]) if body["needs_review"] else "ok"
        table.add_row(name, body["path"], volumes, "\n".join(outcomes) or "—", review)
    console.print(table)
    for name, body in answers:
        if "report_file" in body:
            console.print(f"report for {name}: {body['report_file']}"
                          + (f" (PDF {body['report_pdf']})" if "report_pdf" in body else ""))


@app.command()
def predict(
    files: list[Path] = typer.Argument(..., help="NIfTI files, DICOM series folders or zips of one series"),
    url: str = typer.Option(None, "--url", help="a running server, e.g. http://127.0.0.1:8000 (else in-process)"),
    checkpoint: list[str] = typer.Option(None, "--checkpoint", help="without --url: the model to run in-process, a "
                                         "folder or storage URI (repeat it to average several)"),
    clinical: str = typer.Option(None, "--clinical", help='clinical record as JSON, e.g. \'{"age": 71}\''),
    out: Path = typer.Option(None, "--out", help="folder for the masks (default: beside each input)"),
    mc_samples: int = typer.Option(None, "--mc-samples", help="Monte Carlo samples (default from the model)"),
    mc_mode: str = typer.Option(None, "--mc-mode", help="full, decoder or heads"),
    api_key_env: str = typer.Option(None, "--api-key-env", help="environment variable holding the server's API key"),
    report: bool = typer.Option(False, "--report", help="also write a per-patient report, <name>_report.html (and "
                                ".pdf where Chromium is installed), beside the mask"),
) -> None:
    """Predict for each input and write its mask (``<name>_mask.nii.gz``) beside it or into --out."""
    import json

    from jointray.inference.client import predict_local, predict_remote

    if (url is None) == (not checkpoint):
        console.print("[red]error:[/red] give --url (a running server) or --checkpoint (run in-process), not both")
        raise typer.Exit(2)
    try:
        record = json.loads(clinical) if clinical else {}
    except json.JSONDecodeError as exc:
        console.print(f"[red]error:[/red] --clinical is not valid JSON ({exc.msg})")
        raise typer.Exit(2) from None
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        console.print(f"[red]error:[/red] no such file or folder: {', '.join(missing)}")
        raise typer.Exit(2)
    if url is not None:
        key = os.environ.get(api_key_env) if api_key_env else None
        if api_key_env and not key:
            console.print(f"[red]error:[/red] --api-key-env {api_key_env}: that environment variable is not set")
            raise typer.Exit(2)
        answers = predict_remote(url, files, record, out, mc_samples, mc_mode, key, report)
    else:
        from jointray.artifacts import CheckpointError

        with _usage_errors(CheckpointError):
            answers = predict_local(checkpoint, files, record, out, mc_samples, mc_mode, report)
    _print_predictions(answers)
    if all("error" in body for _, body in answers):
        raise typer.Exit(1)


@app.command()
def explain(
    file: Path = typer.Argument(..., help="a NIfTI file, DICOM series folder or zip of one series"),
    checkpoint: list[str] = typer.Option(..., "--checkpoint", help="the model, a folder or storage URI (an "
                                         "ensemble: its first member)"),
    clinical: str = typer.Option(None, "--clinical", help='clinical record as JSON, e.g. \'{"age": 71}\''),
    out: Path = typer.Option(None, "--out", help="folder for what is written (default: beside the input)"),
    method: str = typer.Option("hirescam", "--method", help="activation maps: hirescam or gradcam"),
) -> None:
    """Explain one prediction: an activation map per structure and outcome head (NIfTI), the clinical features'
    Integrated Gradients (JSON), and the per-patient report showing both."""
    import json

    from jointray.artifacts import CheckpointError
    from jointray.data.errors import InputError
    from jointray.inference.explain import explain_file

    try:
        record = json.loads(clinical) if clinical else {}
    except json.JSONDecodeError as exc:
        console.print(f"[red]error:[/red] --clinical is not valid JSON ({exc.msg})")
        raise typer.Exit(2) from None
    if not file.exists():
        console.print(f"[red]error:[/red] no such file or folder: {file}")
        raise typer.Exit(2)
    with _usage_errors(CheckpointError, ValueError):
        try:
            if method not in ("hirescam", "gradcam"):
                raise ValueError(f"--method {method}: expected hirescam or gradcam")
            written = explain_file(checkpoint, file, record, out, method)
        except InputError as exc:
            raise ValueError(f"{exc.path}: {exc.reason}") from None
    for target, path in written["maps"].items():
        console.print(f"{written['explanation'].method} {target} ({written['explanation'].layers[target]}): {path}")
    for head, values in written["explanation"].attributions.items():
        console.print(f"{head}: " + ", ".join(f"{k} {v:+.3f}" for k, v in values.items()))
    console.print(f"report: [bold]{written['report']}[/bold]")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def demo(
    config: str = typer.Option("synthetic", "--config", "-c", help=CONFIG_HELP),
    overrides: list[str] = typer.Argument(None, help="dotted overrides, e.g. train.epochs=3"),
    held_out: int = typer.Option(16, "--held-out", min=1, help="held-out synthetic subjects to evaluate on"),
    calibration: int = typer.Option(60, "--calibration", min=49, help="held-back synthetic subjects to calibrate "
                                    "on (at least 49: the OOD test at 2 % needs them)"),
) -> None:
    """The whole path on the synthetic cohort: prepare → train → calibrate on held-back subjects → evaluate on
    held-out subjects → serve over HTTP → a small hyperparameter search that exports its best checkpoint."""
    cfg = _config(config, overrides)
    if cfg.data.format != "synthetic":
        console.print("[red]error:[/red] the demo runs on the synthetic cohort (data.format=synthetic)")
        raise typer.Exit(2)
    # The search: the config's own tune section, else tune_synthetic's search (one worker per trial) over
    # the demo's data, one epoch per trial so that the whole demo stays within ten minutes here. No head
    # refit in those trials: after one epoch there is no representation worth refitting on.
    search_cfg = cfg if cfg.tune.space else _config("tune_synthetic", [
        "train.epochs=1", "train.refit.enabled=false", *(overrides or []), override_text("data", cfg.model_dump(mode="json")["data"]),
        override_text("tune.storage_path", cfg.train.storage_path)])
    # These take seconds to import (Ray, torch, MONAI): after the check, so that a wrong config fails at once.
    from jointray.data.prepare import prepare_dataset
    from jointray.data.synthetic import generate_cohort
    from jointray.inference.calibrate import calibrate as run_calibration
    from jointray.inference.evaluate import evaluate as run_evaluation
    from jointray.report.evaluation import build_report
    from jointray.runtime import init_ray
    from jointray.train.progress import summary_table
    from jointray.train.trainer import run_training
    from jointray.tune.search import remove_search, run_search, search_folder

    init_ray(cfg.ray)
    console.rule("1/6 prepare")
    report = prepare_dataset(cfg)
    _print_prepare_report(report)
    console.rule("2/6 train")
    with _usage_errors():
        result = run_training(cfg, announce=console.print)
    console.print(summary_table(result.metrics, f"jointray train: {cfg.train.name} (best checkpoint)"))
    console.rule("3/6 calibrate on held-back subjects")
    s = cfg.data.synthetic
    calibration_root, held_out_root = Path(f"{cfg.data.root}_calibration"), Path(f"{cfg.data.root}_held_out")
    # Unseen seeds: the calibration subjects neither trained the model nor chose its checkpoint, and the
    # held-out ones played no part in anything.
    generate_cohort(calibration_root, calibration, s.seed + 2, tuple(s.shape), tuple(s.spacing))
    generate_cohort(held_out_root, held_out, s.seed + 1, tuple(s.shape), tuple(s.spacing))
    with _usage_errors():
        fitted, calibrated = run_calibration(result.best_dir, calibration_root / "manifest.csv",
                                             result.run_dir / "calibrated", mc_samples=cfg.inference.mc_samples)
    console.print(fitted.coverage_sentence(cfg.inference.interval))
    console.rule("4/6 evaluate on held-out subjects")
    # The calibrated model, with the Monte Carlo settings it was calibrated under: the report's intervals,
    # predicted Dice and review sections fill.
    evaluation = run_evaluation(calibrated, held_out_root / "manifest.csv", result.run_dir / "evaluation")
    _print_evaluation(evaluation)
    report_path = Path(evaluation.out) / "report.html"
    build_report([evaluation.out], report_path)
    console.rule("5/6 serve the calibrated model and predict over HTTP")
    patient_report = _demo_serving(calibrated, held_out_root / "manifest.csv", result.run_dir / "served")
    console.rule(f"6/6 search: {search_cfg.tune.num_samples} short trials with Ray Tune + Optuna")
    remove_search(search_folder(search_cfg))  # the demo's own search, from its previous run
    with _usage_errors():
        _print_search(run_search(search_cfg))
    console.print(f"[bold]best checkpoint:[/bold] {result.best_dir}")
    console.print(f"[bold]evaluation report:[/bold] {report_path}\n[bold]patient report:[/bold] {patient_report}\n"
                  "(open them in a browser: they need nothing else)")


def _demo_serving(checkpoint: Path, manifest: Path, out: Path) -> Path | None:
    """Serve ``checkpoint`` on a free loopback port, send one held-out synthetic case (with its clinical record,
    asking for its patient report) and one real DICOM study (:data:`DEMO_DICOM`, where there is one) through
    the HTTP client, then shut down; the patient report's path."""
    import pandas as pd
    from ray import serve as ray_serve

    from jointray.artifacts import load_models
    from jointray.inference.client import predict_remote
    from jointray.serve.app import free_port, start

    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    schema = load_models(checkpoint).members[0].schema
    row = pd.read_csv(manifest).iloc[0]
    clinical = {}
    for name in [f.name for f in schema.numeric] + [f.name for f in schema.categorical]:
        value = row.get(name)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            clinical[name] = value.item() if hasattr(value, "item") else value
    inputs = [manifest.parent / row["image"]]
    if DEMO_DICOM.is_dir():
        inputs.append(DEMO_DICOM)
    else:
        console.print(f"no DICOM study at {DEMO_DICOM}: sending the synthetic case only")
    url = start(checkpoint, [f"serve.port={free_port(8000)}"])
    console.print(f"serving at {url} (viewer {url}/, API {url}/docs)")
    try:
        answers = predict_remote(url, inputs[:1], clinical, out, None, None, report=True)
        answers += predict_remote(url, inputs[1:], {}, out, None, None)
        _print_predictions(answers)
        console.print(f"masks: {out}")
    finally:
        ray_serve.shutdown()
        console.print("server shut down")
    return Path(answers[0][1]["report_file"]) if "report_file" in answers[0][1] else None


@app.command("config", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def show_config(
    config: str = typer.Argument(..., help=CONFIG_HELP),
    overrides: list[str] = typer.Argument(None, help="dotted overrides, e.g. train.epochs=5"),
) -> None:
    """Print the resolved configuration as YAML: every key after the overrides, data paths as given."""
    import yaml

    cfg = _config(config, overrides)
    # Lists of scalars on one line ([48, 48, 48]), as the shipped files write them.
    typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, default_flow_style=None), nl=False)


@app.command("model-summary", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def model_summary(
    config: str = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    overrides: list[str] = typer.Argument(None, help="dotted overrides, e.g. model.variant=dv1"),
) -> None:
    """Print the configured model's parameters, FLOPs per case and output shapes."""
    from jointray.models.summary import summarise

    cfg = _config(config, overrides)
    with _usage_errors(ValueError):
        summary = summarise(cfg)
    table = Table(title=f"jointray model: {summary.variant}", show_header=False)
    table.add_row("parameters", f"{summary.parameters:,}")
    table.add_row("input (one case)", str(summary.input_shape))
    table.add_row("forward FLOPs per case", f"{summary.flops_per_case / 1e9:.2f} GFLOP")
    for name, shape in summary.output_shapes.items():
        table.add_row(f"output {name}", str(shape))
    console.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
