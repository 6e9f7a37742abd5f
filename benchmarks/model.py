"""Model cost per variant on this machine: time, peak memory, FLOPs, achieved GFLOP/s, MC-dropout cost.

For each variant and input size (the MSD grid 48x64x48 and 64^3): forward (inference, no grad) and
forward+backward time per case, peak resident memory per case, FLOPs per case (torch's flop
counter), and achieved GFLOP/s as a fraction of this CPU's fp32 matmul peak measured in the same
run. Then the cost of T=20 Monte Carlo samples in ``full`` and ``heads`` mode relative to one
deterministic pass. Each measurement runs in a fresh process so peak memory is its own.

    python benchmarks/model.py [--batch 2] [--repeats 3] [--out benchmarks/results/model.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("v2", "dv", "dv1", "seg_only", "outcome_only")
SHAPES = {"msd 48x64x48": (48, 64, 48), "64^3": (64, 64, 64)}
MC_SAMPLES = 20


def matmul_peak_gflops(size: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e9


def _model_and_inputs(variant: str, shape: tuple[int, int, int], batch: int):
    from jointray.config import load_config
    from jointray.models import build_model

    cfg = load_config(None, [f"model.variant={variant}", f"preprocess.target_shape={list(shape)}"])
    channels = 2 if variant == "dv" else 1
    model = build_model(cfg.model, channels)
    image = torch.randn(batch, channels, *shape)
    clinical = model.clinical.all_missing(batch, "cpu") if model.clinical is not None else None
    return model, image, clinical


def _scalar(out) -> torch.Tensor:
    parts = [t.float().mean() for t in (out.seg or [])] + [t.float().mean() for t in out.outcomes.values()]
    return sum(parts)


def _measure(variant: str, shape: tuple[int, int, int], batch: int, repeats: int, kind: str, queue) -> None:
    """Runs in a child process: time and peak RSS of ``kind`` ("forward" or "train") per case."""
    torch.manual_seed(0)
    model, image, clinical = _model_and_inputs(variant, shape, batch)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for i in range(repeats + 1):  # the first call warms up oneDNN's kernels and is not timed
        started = time.perf_counter()
        if kind == "forward":
            model.eval()
            with torch.no_grad():
                model(image, clinical)
        else:
            model.train()
            _scalar(model(image, clinical)).backward()
            model.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - started)
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline) / 1024
    result = {"seconds_per_case": min(times) / batch, "peak_mb_per_case": peak_mb / batch}
    if kind == "forward":
        from jointray.config import load_config
        from jointray.models.summary import summarise

        cfg = load_config(None, [f"model.variant={variant}", f"preprocess.target_shape={list(shape)}",
                                 f"preprocess.channels={image.shape[1]}"])
        result["flops_per_case"] = summarise(cfg, model=model).flops_per_case
    queue.put(result)


def _mc_costs(shape: tuple[int, int, int], repeats: int, queue) -> None:
    from jointray.models import mc_sample

    torch.manual_seed(0)
    model, image, clinical = _model_and_inputs("v2", shape, 1)
    model.eval()

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return min(times)

    def single_pass():
        with torch.no_grad():
            model(image, clinical)

    full = best(lambda: mc_sample(model, image, clinical, MC_SAMPLES, "full"))
    heads = best(lambda: mc_sample(model, image, clinical, MC_SAMPLES, "heads"))
    single = best(single_pass)
    queue.put({"single_pass_s": single, "full_s": full, "heads_s": heads,
               "full_ratio": full / single, "heads_ratio": heads / single})


def _in_child(target, *args):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=target, args=(*args, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "model.json"))
    args = parser.parse_args()
    from rich.console import Console
    from rich.table import Table

    peak = matmul_peak_gflops()
    rows = []
    for shape_name, shape in SHAPES.items():
        for variant in VARIANTS:
            forward = _in_child(_measure, variant, shape, args.batch, args.repeats, "forward")
            train = _in_child(_measure, variant, shape, args.batch, args.repeats, "train")
            flops = forward["flops_per_case"]
            rows.append({
                "variant": variant, "shape": shape_name, "flops_per_case": flops,
                "forward_s": forward["seconds_per_case"], "train_s": train["seconds_per_case"],
                "forward_peak_mb": forward["peak_mb_per_case"], "train_peak_mb": train["peak_mb_per_case"],
                "forward_gflops": flops / forward["seconds_per_case"] / 1e9,
                # backward ≈ 2× forward FLOPs (weights and inputs): the usual 3× rule for training
                "train_gflops": 3 * flops / train["seconds_per_case"] / 1e9,
            })
    mc = _in_child(_mc_costs, SHAPES["msd 48x64x48"], 2 * args.repeats)

    table = Table(title=f"jointray models, batch {args.batch}, {torch.get_num_threads()} threads; "
                        f"fp32 matmul peak {peak:.0f} GFLOP/s")
    for column in ("variant", "input", "GFLOP/case", "fwd ms/case", "fwd+bwd ms/case", "fwd MB/case",
                   "train MB/case", "fwd % peak", "train % peak"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(r["variant"], r["shape"], f"{r['flops_per_case'] / 1e9:.2f}", f"{r['forward_s'] * 1e3:.0f}",
                      f"{r['train_s'] * 1e3:.0f}", f"{r['forward_peak_mb']:.0f}", f"{r['train_peak_mb']:.0f}",
                      f"{100 * r['forward_gflops'] / peak:.1f}", f"{100 * r['train_gflops'] / peak:.1f}")
    console = Console(width=160)
    console.print(table)
    console.print(f"MC dropout, v2, T={MC_SAMPLES}, one case at 48x64x48: full = {mc['full_ratio']:.1f}x and "
                  f"heads = {mc['heads_ratio']:.2f}x one deterministic pass ({mc['single_pass_s'] * 1e3:.0f} ms)")
    result = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "matmul_peak_gflops": peak, "batch": args.batch, "rows": rows, "mc_dropout": mc}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
