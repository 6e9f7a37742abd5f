"""DDP scaling of v2: what one step costs, what the gradient all-reduce adds, and what that predicts for GPUs.

Per configuration (``msd_hippocampus`` and ``synthetic``, each at its own grid and batch size):

* **measured here**: one training step (forward, loss, backward, AdamW) on this CPU, the median of
  ``--steps`` after a warm-up; the step's FLOPs (torch's flop counter, forward + backward); the bytes DDP
  all-reduces per step (every trainable parameter's gradient in fp32: DDP reduces the parameters' own
  dtype, whatever the autocast).
* **modelled**: ring all-reduce (Patarasuk & Yuan 2009; NCCL's ring): ``t = 2 (N-1)/N · bytes / B +
  2 (N-1) · α`` for N GPUs on links of B = 25 and 100 Gb/s and a per-hop latency α (``--latency-us``).
  Weak scaling (``train.batch_size`` per GPU): a step takes ``t_compute + t_comm`` without overlap, and
  ``t_forward + max(t_backward, t_comm)`` with DDP's bucketed all-reduce fully hidden behind the
  backward pass; throughput = N · batch / step, efficiency = one GPU's step / N GPUs' step. A GPU's
  compute time is **not measured here** (no GPU): it is the step's FLOPs at ``--gpu-tflops`` ×
  ``--gpu-utilization``, both assumptions printed with the table (give ``--gpu-step-ms`` from a real GPU
  to replace them).
* **1 vs 2 worker processes, measured here**: DDP over gloo on the loopback, 1 thread per process, against
  one process: the measured 2-process step beside the model's prediction from the measured all-reduce
  bandwidth of the loopback.

    python benchmarks/scaling.py [--steps 8] [--gpu-tflops 312 --gpu-utilization 0.3] [--latency-us 10]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ("msd_hippocampus", "synthetic")
GPUS = (1, 2, 4, 8, 16)
LINKS_GBPS = (25, 100)


def _setup(config: str):
    from jointray.config import load_config
    from jointray.data.clinical import ClinicalSchema
    from jointray.losses.joint import JointLoss
    from jointray.models import build_model

    cfg = load_config(config, [])
    schema = ClinicalSchema()
    model = build_model(cfg.model, cfg.preprocess.channels, schema)
    batch = cfg.train.batch_size
    image = torch.randn(batch, cfg.preprocess.channels, *cfg.preprocess.target_shape)
    label = torch.randint(0, cfg.model.num_classes, (batch, *cfg.preprocess.target_shape))
    return cfg, model, image, label, JointLoss(cfg.model, cfg.train.loss)


def _step_fn(cfg, model, image, label, loss_fn, optimizer):
    from jointray.tasks import Targets

    targets = Targets(label=label, has_label=torch.ones(label.shape[0], dtype=torch.bool))

    def step() -> tuple[float, float]:
        """One training step; returns (forward seconds, whole step seconds)."""
        started = time.perf_counter()
        out = model(image, None, 1.0, torch.ones(image.shape[0]))
        # Every head's output enters the loss (at weight 0 where it has no target): DDP needs a gradient
        # for every parameter, as the trainer's balanced loss gives it.
        loss = loss_fn(out, targets)["seg"] + sum(v.float().sum() * 0.0 for v in out.outcomes.values())
        forward = time.perf_counter() - started
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return forward, time.perf_counter() - started

    return step


def measure(config: str, steps: int, threads: int) -> dict:
    """One process: step time, forward share, FLOPs and gradient bytes."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg, model, image, label, loss_fn = _setup(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step = _step_fn(cfg, model, image, label, loss_fn, optimizer)
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    for _ in range(2):
        step()
    times = [step() for _ in range(steps)]
    total = statistics.median(t for _, t in times)
    forward = statistics.median(f for f, _ in times)
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return {"config": config, "batch": cfg.train.batch_size, "shape": list(cfg.preprocess.target_shape),
            "step_s": total, "forward_share": forward / total, "flops_per_step": counter.get_total_flops(),
            "grad_bytes": grad_bytes, "threads": threads}


def ring_allreduce_s(nbytes: float, gpus: int, gbps: float, latency_s: float) -> float:
    if gpus == 1:
        return 0.0
    return 2 * (gpus - 1) / gpus * nbytes * 8 / (gbps * 1e9) + 2 * (gpus - 1) * latency_s


def predict(step_s: float, forward_share: float, nbytes: float, batch: int, gpus: int, gbps: float,
            latency_s: float) -> dict:
    comm = ring_allreduce_s(nbytes, gpus, gbps, latency_s)
    forward, backward = step_s * forward_share, step_s * (1 - forward_share)
    serial, overlapped = step_s + comm, forward + max(backward, comm)
    return {"comm_s": comm, "cases_per_s_serial": gpus * batch / serial,
            "cases_per_s_overlap": gpus * batch / overlapped,
            "efficiency_serial": step_s / serial, "efficiency_overlap": step_s / overlapped}


def _ddp_worker(rank: int, world: int, port: int, config: str, steps: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg, model, image, label, loss_fn = _setup(config)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-4)
    step = _step_fn(cfg, ddp, image, label, loss_fn, optimizer)
    for _ in range(2):
        step()
    times = [step()[1] for _ in range(steps)]
    grads = torch.zeros(sum(p.numel() for p in model.parameters() if p.requires_grad))
    dist.all_reduce(grads)
    started = time.perf_counter()
    for _ in range(5):
        dist.all_reduce(grads)
    allreduce = (time.perf_counter() - started) / 5
    if rank == 0:
        queue.put({"step_s": statistics.median(times), "allreduce_s": allreduce, "bytes": grads.numel() * 4})
    dist.destroy_process_group()


def measure_two_processes(config: str, steps: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.Queue()
    mp.start_processes(_ddp_worker, args=(2, port, config, steps, queue), nprocs=2, start_method="spawn")
    return queue.get()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--gpu-tflops", type=float, default=312.0, help="peak dense bf16 TFLOP/s (A100: 312)")
    parser.add_argument("--gpu-utilization", type=float, default=0.3, help="share of the peak a 3D U-Net step reaches")
    parser.add_argument("--gpu-step-ms", type=float, help="a step measured on a real GPU (replaces the two above)")
    parser.add_argument("--latency-us", type=float, default=10.0, help="per-hop latency of the ring")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "scaling.json"))
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    results = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "configs": {}}
    for config in CONFIGS:
        one = measure(config, args.steps, threads=1)
        two = measure_two_processes(config, args.steps)
        gpu_step = (args.gpu_step_ms / 1e3 if args.gpu_step_ms else
                    one["flops_per_step"] / (args.gpu_tflops * 1e12 * args.gpu_utilization))
        modelled_two = one["step_s"] + two["allreduce_s"]  # gloo all-reduce runs after backward here
        entry = {"one_process": one, "two_processes": two, "gpu_step_s": gpu_step,
                 "two_processes_modelled_step_s": modelled_two, "predictions": {}}
        source = ("measured" if args.gpu_step_ms else
                  f"assumed: {args.gpu_tflops:g} TFLOP/s x {args.gpu_utilization:g} utilisation")
        table = Table(title=f"{config}: {one['shape']} batch {one['batch']} per GPU; {one['flops_per_step'] / 1e9:.1f} "
                            f"GFLOP and {one['grad_bytes'] / 1e6:.1f} MB of gradients per step; GPU step "
                            f"{gpu_step * 1e3:.1f} ms ({source})")
        for column in ("GPUs", "link", "all-reduce ms", "cases/s (no overlap)", "efficiency", "cases/s (overlap)",
                       "efficiency (overlap)"):
            table.add_column(column, justify="right")
        for gbps in LINKS_GBPS:
            for gpus in GPUS:
                p = predict(gpu_step, one["forward_share"], one["grad_bytes"], one["batch"], gpus, gbps,
                            args.latency_us * 1e-6)
                entry["predictions"][f"{gpus}x{gbps}"] = p
                table.add_row(str(gpus), f"{gbps} Gb/s", f"{p['comm_s'] * 1e3:.2f}", f"{p['cases_per_s_serial']:.0f}",
                              f"{p['efficiency_serial']:.0%}", f"{p['cases_per_s_overlap']:.0f}",
                              f"{p['efficiency_overlap']:.0%}")
        console.print(table)
        bandwidth = two["bytes"] * 8 * 2 * (2 - 1) / 2 / two["allreduce_s"] / 1e9
        console.print(f"measured here, 1 thread per process: 1 process {one['step_s'] * 1e3:.0f} ms per step; "
                      f"2 DDP processes {two['step_s'] * 1e3:.0f} ms measured, {modelled_two * 1e3:.0f} ms modelled "
                      f"(the gloo all-reduce of {two['bytes'] / 1e6:.1f} MB takes {two['allreduce_s'] * 1e3:.1f} ms: "
                      f"{bandwidth:.1f} Gb/s on the loopback)")
        results["configs"][config] = entry
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results | {"assumptions": vars(args)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
