"""Deployable models of the MSD model: size, speed, memory and accuracy of each export, from one run.

Exports one checkpoint (default: fold 0 of ``benchmarks/accuracy_msd.py --all-folds``) with
``jointray export`` as: PyTorch fp32, ONNX fp32, ONNX INT8, pruned 50 % (global magnitude, fine-tuned
``--finetune-steps``) in PyTorch, and pruned 50 % + INT8 in ONNX; PyTorch bf16 is the fp32 checkpoint
under bf16 autocast. Each model is then measured in a fresh process (so peak memory is its own) with
``--threads`` threads, through the same :class:`~jointray.inference.predictor.Predictor` that ``evaluate``
and the server run:

* model file size, raw and gzip-compressed (zeros compress: pruning shows there, not in the raw size);
* latency of a deterministic forward pass (no mirroring, no MC) at batch 1 and 8, p50/p95 per batch,
  and cases/s at batch 8;
* peak resident memory of the process (load, timing and the accuracy pass);
* Dice (mean and per structure) and HD95 with test-time mirroring on the held-out test cases of
  ``accuracy_msd.py`` (``--cases``): cases no fold trained or chose a checkpoint on.

For the ONNX models, onnxruntime's profiler splits the batch-1 time by operator type: where INT8 does or
does not save time.

    python benchmarks/export.py [--checkpoint runs/bench_msd/fold_0/best] [--cases runs/bench_msd_split/test]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO = Path(__file__).resolve().parents[1]
STRUCTURES = ("anterior", "posterior")
#: name → (export settings, inference precision); None: the checkpoint itself.
VARIANTS = {
    "PyTorch fp32": (None, "fp32"),
    "PyTorch bf16": (None, "bf16"),
    "ONNX fp32": ({"format": "onnx"}, "fp32"),
    "ONNX INT8": ({"format": "onnx", "quantize": "int8"}, "fp32"),
    "pruned 50% (PyTorch)": ({"format": "torch", "prune": 0.5}, "fp32"),
    "pruned 50% + INT8 (ONNX)": ({"format": "onnx", "quantize": "int8", "prune": 0.5}, "fp32"),
}


def model_files(source: Path) -> list[Path]:
    from jointray.artifacts import MODEL_FILE, STATE_FILE, load_model

    artifact = load_model(source)
    if artifact.runtime != "torch":
        return [artifact.graphs["deterministic"]]
    return [source / MODEL_FILE] if (source / MODEL_FILE).is_file() else [source / STATE_FILE]


def _profile(graph: Path, inputs: dict[str, np.ndarray], threads: int, repeats: int) -> dict[str, float]:
    """Share of onnxruntime's node time by operator type over ``repeats`` runs of ``inputs``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        feed = {i.name: inputs[i.name] for i in session.get_inputs()}
        session.run(None, feed)
        for _ in range(repeats):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    by_op: dict[str, float] = defaultdict(float)
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            by_op[event["args"]["op_name"]] += event["dur"]
    total = sum(by_op.values())
    return {op: t / total for op, t in sorted(by_op.items(), key=lambda kv: -kv[1])}


def _peak_rss_mb() -> float:
    """This process's peak resident memory since its exec (``VmHWM``). Not ``ru_maxrss``: Linux keeps that
    across exec, so a child of this script would report the parent's peak."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def measure(source: Path, precision: str, cases: Path, threads: int, repeats: int) -> dict:
    """In a fresh process: latency, memory and accuracy of the model at ``source``."""
    import torch

    from jointray.artifacts import load_model
    from jointray.data.sources import scan_msd
    from jointray.export.graph import INPUT_NAMES
    from jointray.inference.predictor import Predictor

    torch.set_num_threads(threads)
    inference = load_model(source).config.inference
    timing = Predictor(source, device="cpu", inference=inference.model_copy(
        update={"precision": precision, "mirror": False}))
    cfg = timing.config
    records = scan_msd(cases, cfg.data.label_names).records
    prepared = [timing.prepare(r) for r in records[:8]]
    latency = {}
    for batch in (1, 8):
        chunk = prepared[:batch]
        timing.forward(chunk, 1)  # warm-up: allocators, oneDNN primitives, onnxruntime's arena
        seconds = []
        for _ in range(repeats if batch == 1 else max(3, repeats // 4)):
            started = time.perf_counter()
            timing.forward(chunk, 1)
            seconds.append(time.perf_counter() - started)
        p50, p95 = np.percentile(seconds, [50, 95])
        latency[str(batch)] = {"p50_s": float(p50), "p95_s": float(p95), "cases_per_s": batch / float(p50)}
    profile = {}
    if timing.runtimes == ["onnxruntime"]:
        image, clinical, vv, _ = timing.tensors(prepared[:1])
        c = clinical[0]
        tensors = (image, c.numeric, c.missing, c.categorical, vv)
        inputs = dict(zip(INPUT_NAMES, (t.contiguous().numpy() for t in tensors)))
        profile = _profile(timing.models[0].deterministic.path, inputs, threads, repeats)
    del timing
    scoring = Predictor(source, device="cpu", inference=inference.model_copy(update={"precision": precision}))
    rows = []
    for start in range(0, len(records), 4):
        rows += [p.metrics for p in scoring.predict_batch(records[start:start + 4])]
    accuracy = {"dice": float(np.mean([[r[f"dice/{name}"] for name in STRUCTURES] for r in rows]))}
    for name in STRUCTURES:
        accuracy[f"dice/{name}"] = float(np.mean([r[f"dice/{name}"] for r in rows]))
        accuracy[f"hd95/{name}"] = float(np.mean([r[f"hd95/{name}"] for r in rows]))
    files = model_files(source)
    raw = sum(f.stat().st_size for f in files)
    packed = sum(len(gzip.compress(f.read_bytes(), 6)) for f in files)
    return {"latency": latency, "accuracy": accuracy, "cases": len(rows), "size_mb": raw / 1e6,
            "gzip_mb": packed / 1e6, "peak_rss_mb": _peak_rss_mb(),
            "profile": profile}


def export_all(checkpoint: Path, folder: Path, finetune_steps: int, prepared: Path | None) -> dict[str, tuple]:
    """name → (model folder, precision, export seconds)."""
    from jointray.artifacts import export_artifact
    from jointray.export.exporter import ExportSettings, export_model

    started = time.perf_counter()
    plain = export_artifact(checkpoint, folder / "torch")  # the weights alone: a fair file size for fp32
    sources = {"PyTorch fp32": (plain, "fp32", time.perf_counter() - started), "PyTorch bf16": (plain, "bf16", 0.0)}
    for name, (settings, precision) in VARIANTS.items():
        if settings is None:
            continue
        started = time.perf_counter()
        out = folder / name.split(" (")[0].replace(" ", "_").replace("%", "").replace("+", "and")
        export_model(checkpoint, out, ExportSettings(**settings, finetune_steps=finetune_steps, prepared=prepared))
        sources[name] = (out, precision, time.perf_counter() - started)
    return sources


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="runs/bench_msd/fold_0/best")
    parser.add_argument("--cases", default="runs/bench_msd_split/test", help="held-out MSD folder (dataset.json)")
    parser.add_argument("--prepared", help="prepared shards of the checkpoint (default: its data.output)")
    parser.add_argument("--folder", default="runs/bench_export", help="where the exports go")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=20, help="timed batch-1 passes (batch 8: a quarter)")
    parser.add_argument("--finetune-steps", type=int, default=100)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "export.json"))
    parser.add_argument("--measure", nargs=2, metavar=("SOURCE", "PRECISION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        result = measure(Path(args.measure[0]), args.measure[1], Path(args.cases), args.threads, args.repeats)
        print("RESULT " + json.dumps(result))
        return

    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    sources = export_all(Path(args.checkpoint), Path(args.folder), args.finetune_steps,
                         Path(args.prepared) if args.prepared else None)
    results = {}
    for name, (source, precision, export_s) in sources.items():
        console.print(f"measuring {name} ...")
        child = subprocess.run([sys.executable, __file__, "--measure", str(source), precision, "--cases", args.cases,
                                "--threads", str(args.threads), "--repeats", str(args.repeats)],
                               capture_output=True, text=True, check=True)
        line = next(x for x in child.stdout.splitlines() if x.startswith("RESULT "))
        results[name] = json.loads(line.removeprefix("RESULT ")) | {"export_s": export_s, "source": str(source)}

    base = results["PyTorch fp32"]
    table = Table(title=f"MSD model exports: {base['cases']} held-out test cases, {args.threads} threads, "
                        f"{platform.processor() or platform.machine()}")
    for column in ("model", "size MB", "gzip MB", "batch 1 p50/p95 ms", "batch 8 p50/p95 ms", "cases/s (b8)",
                   "speed-up (b8)", "peak RSS MB", "Dice", "Dice ant/post", "ΔDice", "HD95 ant/post mm"):
        table.add_column(column, justify="right")
    for name, r in results.items():
        b1, b8, base8, a = r["latency"]["1"], r["latency"]["8"], base["latency"]["8"], r["accuracy"]
        table.add_row(name, f"{r['size_mb']:.2f}", f"{r['gzip_mb']:.2f}",
                      f"{b1['p50_s'] * 1e3:.0f}/{b1['p95_s'] * 1e3:.0f}",
                      f"{b8['p50_s'] * 1e3:.0f}/{b8['p95_s'] * 1e3:.0f}",
                      f"{b8['cases_per_s']:.1f}", f"{base8['p50_s'] / b8['p50_s']:.2f}×", f"{r['peak_rss_mb']:.0f}",
                      f"{a['dice']:.4f}", f"{a['dice/anterior']:.4f}/{a['dice/posterior']:.4f}",
                      f"{a['dice'] - base['accuracy']['dice']:+.4f}",
                      f"{a['hd95/anterior']:.2f}/{a['hd95/posterior']:.2f}")
    console.print(table)
    for name, r in results.items():
        if r["profile"]:
            shares = ", ".join(f"{op} {share:.0%}" for op, share in list(r["profile"].items())[:6])
            console.print(f"onnxruntime time by operator, {name}: {shares}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"checkpoint": args.checkpoint, "cases": args.cases, "threads": args.threads,
                                          "machine": platform.machine(), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
