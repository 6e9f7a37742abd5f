"""Serving under load: the Ray Serve application against concurrent HTTP clients on real MSD volumes.

Every scenario deploys the application on a local Ray instance (HTTP on 127.0.0.1), then N client
threads post real MSD hippocampus images to ``/v1/predict`` for a fixed time. Reported per scenario:
throughput, p50/p95/p99 latency, errors, and the batch sizes the model deployment saw.

1. ``max_batch_size`` 1 vs 8, one deterministic pass per request (``mc_samples=1``);
2. MC dropout at T=20 in ``heads``, ``decoder`` and ``full`` mode (batch 8);
3. the same requests through a plain single-process :class:`Predictor` loop (prepare → forward → finish,
   one request at a time): the cost or gain of the server;
4. the forward stage alone, in-process, one case: one deterministic pass, each MC mode at T=20, and 20
   separate deterministic passes (what vectorising saves);
5. fault: 2 model replicas under load, one replica's actor killed mid-run (``ray.kill`` on an actor
   found through ``ray.util.state``): failed requests, and the time until Serve reports both
   replicas running again.

    python benchmarks/serve_load.py --checkpoint runs/msd_hippocampus/best [--clients 8] [--seconds 30]

Without ``--checkpoint`` it first trains ``configs/msd_hippocampus.yaml`` for ``--train-minutes`` on the
MSD cases. Prints a table and writes ``benchmarks/results/serve_load.json``. MSD Task04 Hippocampus:
Simpson et al., arXiv:1902.09063, CC-BY-SA 4.0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")

import numpy as np  # noqa: E402
import ray  # noqa: E402
import requests  # noqa: E402
from ray import serve  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from jointray.config import RayConfig, load_config  # noqa: E402
from jointray.data.prepare import prepare_dataset  # noqa: E402
from jointray.inference.predictor import Predictor  # noqa: E402
from jointray.runtime import init_ray  # noqa: E402
from jointray.serve.app import APP_NAME, AppArgs, build_app, free_port, wait_until_healthy  # noqa: E402
from jointray.train.trainer import run_training  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
console = Console()



def _percentiles(latencies: list[float]) -> dict[str, float]:
    if not latencies:
        return {"p50": float("nan"), "p95": float("nan"), "p99": float("nan")}
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99)}


def load(url: str, volumes: list[tuple[str, bytes]], clients: int, seconds: float, form: dict[str, str],
         during=None) -> dict:
    """``clients`` threads posting round-robin for ``seconds``; ``during(elapsed)`` runs in the main thread."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(k: int) -> None:
        i = k
        session = requests.Session()
        while time.monotonic() < stop:
            name, data = volumes[i % len(volumes)]
            i += clients
            started = time.perf_counter()
            try:
                response = session.post(f"{url}/v1/predict", files={"file": (name, data)}, data=form, timeout=300)
                ok, why = response.status_code == 200, f"HTTP {response.status_code}"
            except requests.RequestException as exc:
                ok, why = False, type(exc).__name__
            with lock:
                (latencies.append(time.perf_counter() - started) if ok else errors.append(why))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    started = time.monotonic()
    for t in threads:
        t.start()
    extra = during(started) if during else None
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    return {"requests": len(latencies) + len(errors), "ok": len(latencies), "errors": len(errors),
            "error_kinds": sorted(set(errors)), "throughput_per_s": len(latencies) / elapsed,
            **_percentiles(latencies), "extra": extra}


def deploy(checkpoint: str, port: int, overrides: list[str]) -> str:
    serve.run(build_app(AppArgs(checkpoint=checkpoint, overrides=overrides)), name=APP_NAME, route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    wait_until_healthy(url)
    return url


def batch_sizes() -> list[int]:
    handle = serve.get_deployment_handle("ModelServer", app_name=APP_NAME)
    return handle.batch_sizes.remote().result()


def plain_loop(checkpoint: str, volumes: list[tuple[str, bytes]], seconds: float, samples: int, mode: str) -> dict:
    """The same requests through one in-process Predictor, one at a time."""
    predictor = Predictor(checkpoint, device="cpu")
    latencies = []
    stop, i = time.monotonic() + seconds, 0
    started = time.monotonic()
    while time.monotonic() < stop:
        name, data = volumes[i % len(volumes)]
        i += 1
        t = time.perf_counter()
        case = predictor.prepare(data, name=name)
        result = predictor.forward([case], samples, mode)[0]
        predictor.finish(case, result, samples, mode)
        latencies.append(time.perf_counter() - t)
    return {"requests": len(latencies), "ok": len(latencies), "errors": 0,
            "throughput_per_s": len(latencies) / (time.monotonic() - started), **_percentiles(latencies)}


def forward_costs(checkpoint: str, data: bytes, repeats: int = 3) -> dict[str, float]:
    """Seconds of the forward stage for one case (best of ``repeats``)."""
    predictor = Predictor(checkpoint, device="cpu")
    case = predictor.prepare(data, name="case.nii.gz")

    def best(fn) -> float:
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    costs = {"deterministic": best(lambda: predictor.forward([case], 1))}
    costs["20 separate deterministic passes"] = best(lambda: [predictor.forward([case], 1) for _ in range(20)])
    for mode in ("heads", "decoder", "full"):
        costs[f"{mode} T=20"] = best(lambda: predictor.forward([case], 20, mode))
    return costs


def fault(checkpoint: str, port: int, volumes, clients: int, seconds: float) -> dict:
    """Two model replicas under load; kill one a third of the way in."""
    from ray.util.state import list_actors

    url = deploy(checkpoint, port, ["serve.replicas=2", "serve.replica_cpus=0.5", "inference.mc_samples=1"])

    def kill_one(started: float) -> dict:
        time.sleep(seconds / 3)
        victims = [a for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
                   if "ModelServer" in (a.class_name or "")]
        ray.kill(ray.get_actor(victims[0].name, namespace="serve"), no_restart=True)
        killed = time.monotonic()
        while True:
            deployment = serve.status().applications[APP_NAME].deployments["ModelServer"]
            running = deployment.replica_states.get("RUNNING", 0)
            if running == 2 and deployment.status == "HEALTHY" and time.monotonic() - killed > 1:
                return {"recovered_after_s": time.monotonic() - killed, "killed_at_s": killed - started}
            time.sleep(0.2)

    return load(url, volumes, clients, seconds, {"mc_samples": "1"}, during=kill_one)


def train_checkpoint(minutes: float, root: str) -> str:
    cfg = load_config(REPO / "configs" / "msd_hippocampus.yaml", [
        f"data.root={root}", "data.output=runs/prepared/msd_hippocampus", "train.storage_path=runs",
        "train.name=bench_serve", f"train.max_minutes={minutes}", "train.epochs=200", "train.patience=null"])
    prepare_dataset(cfg)
    return str(run_training(cfg, announce=console.print).best_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="trained checkpoint or exported model (default: train one)")
    parser.add_argument("--root", default=str(REPO.parent / "shared" / "data" / "msd_hippocampus"))
    parser.add_argument("--train-minutes", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--volumes", type=int, default=16, help="distinct MSD images posted round-robin")
    args = parser.parse_args()

    init_ray(RayConfig())
    checkpoint = str(Path(args.checkpoint or train_checkpoint(args.train_minutes, args.root)).resolve())
    images = sorted((Path(args.root) / "imagesTr").glob("hippocampus_*.nii.gz"))[: args.volumes]
    volumes = [(p.name, p.read_bytes()) for p in images]
    port = free_port(0)
    serve.start(http_options={"host": "127.0.0.1", "port": port})

    scenarios = {
        "batch 1, deterministic": (["serve.max_batch_size=1"], {"mc_samples": "1"}),
        "batch 8, deterministic": (["serve.max_batch_size=8"], {"mc_samples": "1"}),
        "batch 8, 1.5 CPUs (2 threads), deterministic": (["serve.max_batch_size=8", "serve.replica_cpus=1.5"],
                                                         {"mc_samples": "1"}),
        "batch 8, 2 replicas x 0.5 CPU, deterministic": (["serve.max_batch_size=8", "serve.replicas=2",
                                                          "serve.replica_cpus=0.5"], {"mc_samples": "1"}),
        "batch 8, MC heads T=20": (["serve.max_batch_size=8"], {"mc_samples": "20", "mc_mode": "heads"}),
        "batch 8, MC decoder T=20": (["serve.max_batch_size=8"], {"mc_samples": "20", "mc_mode": "decoder"}),
        "batch 8, MC full T=20": (["serve.max_batch_size=8"], {"mc_samples": "20", "mc_mode": "full"}),
    }
    results: dict[str, dict] = {}
    for name, (overrides, form) in scenarios.items():
        console.print(f"[bold]{name}[/bold]: {args.clients} clients for {args.seconds:g} s")
        url = deploy(checkpoint, port, overrides)
        results[name] = load(url, volumes, args.clients, args.seconds, form)
        sizes = batch_sizes()
        results[name]["mean_batch_size"] = float(np.mean(sizes)) if sizes else 0.0
        serve.delete(APP_NAME)
    console.print("[bold]fault[/bold]: 2 replicas, one killed")
    results["fault: 2 replicas, one killed"] = fault(checkpoint, port, volumes, args.clients, args.seconds)
    serve.shutdown()
    console.print("[bold]plain single-process Predictor loop[/bold]")
    results["plain Predictor loop, deterministic"] = plain_loop(checkpoint, volumes, args.seconds, 1, "heads")
    costs = forward_costs(checkpoint, volumes[0][1])

    table = Table(title=f"jointray serving: {args.clients} clients, {args.seconds:g} s each, "
                        f"{len(volumes)} MSD volumes")
    for column in ("scenario", "req/s", "p50 s", "p95 s", "p99 s", "errors", "mean batch"):
        table.add_column(column)
    for name, r in results.items():
        table.add_row(name, f"{r['throughput_per_s']:.2f}", f"{r['p50']:.3f}", f"{r['p95']:.3f}", f"{r['p99']:.3f}",
                      f"{r['errors']}/{r['requests']}", f"{r.get('mean_batch_size', float('nan')):.1f}")
    console.print(table)
    forward = Table(title="forward stage, one case, in-process (best of 3)")
    forward.add_column("work")
    forward.add_column("seconds")
    forward.add_column("× one pass")
    for name, seconds in costs.items():
        forward.add_row(name, f"{seconds:.3f}", f"{seconds / costs['deterministic']:.2f}")
    console.print(forward)
    fault_extra = results["fault: 2 replicas, one killed"]["extra"]
    console.print(f"fault: {results['fault: 2 replicas, one killed']['errors']} failed of "
                  f"{results['fault: 2 replicas, one killed']['requests']}; two healthy replicas again "
                  f"{fault_extra['recovered_after_s']:.1f} s after the kill")

    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_load.json").write_text(json.dumps({
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "clients": args.clients,
        "seconds": args.seconds, "checkpoint": checkpoint, "scenarios": results, "forward_s": costs,
        "date": time.strftime("%Y-%m-%d"),
    }, indent=2))
    console.print(f"wrote {out / 'serve_load.json'}")


if __name__ == "__main__":
    main()
