"""Scale-out with the same code: a real two-node Ray cluster, a job submitted to its head, storage on S3."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import optuna
import pandas as pd
import pyarrow.fs as pafs
import pytest
import requests
from conftest import REPO, free_port

from jointray.artifacts import load_model, local_model, read_checkpoint
from jointray.config import load_config
from jointray.data.prepare import prepare_dataset
from jointray.serve.app import wait_until_healthy

BASE = ["data.format=synthetic", "data.synthetic.n_subjects=16", "preprocess.target_shape=[48,48,48]",
        "train.batch_size=4", "train.n_folds=4", "train.augment.enabled=false", "train.patience=null",
        "model.channels=[8,16,32,64]", "train.epochs=1",
        # The head refit (tests/test_refit.py) adds a driver-side pass that this module does not test.
        "train.refit.enabled=false"]


@pytest.fixture(scope="module")
def prepared(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    overrides = [*BASE, f"data.root={root / 'cohort'}", f"data.output={root / 'prepared'}"]
    assert prepare_dataset(load_config(None, overrides)).prepared == 16
    return root, overrides


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # As in an activated virtual environment: a job's `python` is the one Ray and jointray live in.
    path = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    return env | {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO), "PATH": path}


def _under(uri: str, folder: str) -> str:
    """The S3 fixture's URI with its last folder replaced by ``folder`` (credentials and options kept)."""
    path, _, options = uri.partition("?")
    return f"{path.rsplit('/', 1)[0]}/{folder}?{options}"


def _ray_node(ray_bin: str, env: dict[str, str], temp: str, *args: str) -> subprocess.Popen:
    """``ray start --block`` in its own process group, on 127.0.0.1 with one CPU, agent ports and a temp dir
    of its own: on the default ports (52365, ...) the test session's Ray already listens, and a node whose
    agent cannot bind accepts no job ("No available agent"); a node without its own ``--temp-dir`` shares
    the head's session folder on one machine, and one node's runtime-env cleanup deletes the job's working
    directory under the other's workers. `ray stop` would also kill the session's Ray: the test ends
    exactly these process groups."""
    ports = [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
             f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]
    return subprocess.Popen([ray_bin, "start", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=1", *ports,
                             f"--temp-dir={temp}", *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _alive_nodes(dashboard: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{dashboard}/nodes?view=summary", timeout=5) as response:
        summary = json.loads(response.read())["data"]["summary"]
    return sum(node["raylet"]["state"] == "ALIVE" for node in summary)


def test_a_two_node_cluster_trains_searches_and_serves_with_s3_storage(prepared, s3_server):
    """The user's cluster path, for real: a head started with `ray start --head` and a second node with
    `ray start --address`, one CPU each; a training job submitted with `ray job submit` (one DDP worker per
    node), a 2-trial search and a server started with `--address`, runs, search and served model all on S3
    (moto on 127.0.0.1). The prepared shards are a folder both nodes see, as a shared volume would be."""
    root, overrides = prepared
    fs, uri = s3_server
    runs, searches = _under(uri, "cluster-runs"), _under(uri, "cluster-searches")
    env = _env()
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    port, dashboard = free_port(), free_port()
    # Short temp dirs keep the socket paths under the OS limit.
    temps = [tempfile.mkdtemp(prefix="rayhead", dir="/tmp"), tempfile.mkdtemp(prefix="raynode", dir="/tmp")]
    head = _ray_node(ray_bin, env, temps[0], "--head", f"--port={port}", "--include-dashboard=true",
                     "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}")
    nodes = [head]
    server = None
    try:
        _wait_for_dashboard(dashboard, head)
        nodes.append(_ray_node(ray_bin, env, temps[1], f"--address=127.0.0.1:{port}"))
        deadline = time.monotonic() + 120
        while _alive_nodes(dashboard) < 2:
            assert nodes[1].poll() is None, nodes[1].stdout.read()
            assert time.monotonic() < deadline, "the second node did not join the head"
            time.sleep(1)

        # 1. Training, submitted as a Ray job: two DDP workers, one per node; the run and best/ land on S3.
        command = [ray_bin, "job", "submit", f"--address=http://127.0.0.1:{dashboard}", "--working-dir", str(REPO),
                   "--", "python", "jobs/train.py", *overrides, f"train.storage_path={runs}", "train.name=job",
                   "train.workers=2", "train.placement=SPREAD"]
        for _ in range(30):  # the dashboard answers before its job agent is up
            submit = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
            if "No available agent to submit job" not in submit.stderr:
                break
            time.sleep(2)
        output = submit.stdout + submit.stderr
        assert submit.returncode == 0 and "succeeded" in output, output[-4000:]
        assert "best checkpoint: s3://runs-bucket/cluster-runs/job/best" in output.replace("\n", "")
        # Credentials only in Ray's echo of the entrypoint, never in what jointray prints.
        assert all("jobs/train.py" in line for line in output.splitlines() if "key:secret" in line)
        best = f"{_under(uri, 'cluster-runs').partition('?')[0]}/job/best?{uri.partition('?')[2]}"
        trained = read_checkpoint(local_model(best))
        assert trained.metrics["nodes"] == 2  # one worker on each node
        assert trained.state["epoch"] == 0 and trained.metrics["step"] == 2  # 12 training subjects / 2 / batch 4

        # 2. A 2-trial search from a driver outside the cluster (--address): Tune's experiment, the trials'
        # runs and the search's files on S3.
        tune = subprocess.run([sys.executable, "-m", "jointray.cli", "tune", "--address", f"127.0.0.1:{port}",
                               *overrides, "train.workers=1", "train.refit.enabled=false",
                               f"tune.storage_path={searches}", "tune.name=search", "tune.num_samples=2",
                               "tune.scheduler=none", "tune.objectives={val/dice: max}",
                               'tune.space={"train.lr": {"loguniform": [3.0e-4, 3.0e-3]}}'],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert tune.returncode == 0, (tune.stdout + tune.stderr)[-4000:]
        assert "search folder: s3://runs-bucket/cluster-searches/search" in tune.stdout.replace("\n", "")
        folder = "runs-bucket/cluster-searches/search"
        with tempfile.TemporaryDirectory() as local:
            pafs.copy_files(folder, local, source_filesystem=fs)
            table = pd.read_parquet(Path(local) / "results.parquet")
            assert sorted(table["status"]) == ["COMPLETE", "COMPLETE"] and (table["attempts"] == 1).all()
            study = json.loads((Path(local) / "search.json").read_text())["study_name"]
            trials = optuna.load_study(study_name=study, storage=f"sqlite:///{Path(local) / 'optuna.db'}").trials
            assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
            assert read_checkpoint(Path(local) / "best").config.train.lr in set(table["param/train.lr"])
            assert (Path(local) / "best_config.yaml").is_file() and (Path(local) / "tune").is_dir()
            for trial in table["trial_id"]:
                assert (Path(local) / "trials" / trial / "best" / "meta.json").is_file()

        # 3. The trained model served from its S3 URI by a server started with --address; one request.
        http = free_port()
        server = subprocess.Popen([sys.executable, "-m", "jointray.cli", "serve", "--address", f"127.0.0.1:{port}",
                                   "--checkpoint", best, "--port", str(http), "serve.proxy_location=HeadOnly",
                                   "serve.replica_cpus=0.5", "serve.ingress_cpus=0.25"],
                                  cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  start_new_session=True)
        wait_until_healthy(f"http://127.0.0.1:{http}", timeout_s=300)
        image = root / "cohort" / pd.read_csv(root / "cohort" / "manifest.csv").iloc[0]["image"]
        response = requests.post(f"http://127.0.0.1:{http}/v1/predict",
                                 files={"file": (image.name, image.read_bytes())}, timeout=300)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"]["version"] == load_model(best).version
        assert math.isfinite(body["outcomes"]["mmse"]["mean"]) and body["structures"]
    finally:
        if server is not None:
            _stop(server)
        for node in reversed(nodes):
            _stop(node)
        for temp in temps:
            shutil.rmtree(temp, ignore_errors=True)


def _wait_for_dashboard(port: int, head: subprocess.Popen, timeout_s: float = 120) -> None:
    """Job submission needs the head's dashboard: wait until it answers (or the head died)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise AssertionError(f"ray start --head exited: {head.stdout.read()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"the head node's dashboard did not answer on port {port} within {timeout_s} s")
