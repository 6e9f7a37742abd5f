"""Scale-out with the same code: two Ray nodes, and a job submitted to a real head node."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request

import pytest

from conftest import REPO
from jointray.config import load_config
from jointray.data.prepare import prepare_dataset

BASE = ["data.format=synthetic", "data.synthetic.n_subjects=16", "preprocess.target_shape=[48,48,48]",
        "train.batch_size=4", "train.n_folds=4", "train.augment.enabled=false", "train.patience=null",
        "model.channels=[8,16,32,64]", "train.epochs=1"]


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_one_worker_each(prepared, tmp_path):
    """``ray.cluster_utils.Cluster``: two nodes of one CPU; SPREAD puts one DDP worker on each.
    Runs in its own process, since this one is already connected to the test session's Ray."""
    root, overrides = prepared
    overrides = [*overrides, f"train.storage_path={tmp_path}", "train.name=two_nodes", "train.workers=2",
                 "train.placement=SPREAD"]
    script = textwrap.dedent(f"""
        import json, ray
        from ray.cluster_utils import Cluster
        from jointray.config import load_config
        from jointray.train.trainer import run_training

        cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": 1}})
        cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, log_to_driver=False)
        try:
            assert len([n for n in ray.nodes() if n["Alive"]]) == 2
            result = run_training(load_config(None, {overrides!r}), announce=print)
            print("RESULT", json.dumps(result.metrics))
        finally:
            ray.shutdown()
            cluster.shutdown()
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    metrics = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT"))[7:])
    assert metrics["nodes"] == 2  # one worker per node
    assert metrics["step"] == 2  # 12 training subjects / 2 workers / batch 4
    assert (tmp_path / "two_nodes" / "best" / "meta.json").is_file()


def test_ray_job_submit_to_a_real_head_node(prepared, tmp_path):
    root, overrides = prepared
    port, dashboard, agent, agent_grpc, runtime_env, metrics = (_free_port() for _ in range(6))
    env = _env()
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    # `ray stop` would also kill the test session's own Ray: run the head blocking, in its own process
    # group, and end exactly that group. A short temp dir keeps its socket paths under the OS limit.
    # Its agents get ports of their own: on the defaults (52365, ...) the test session's Ray already
    # listens, and a head whose agent cannot bind accepts no job ("No available agent").
    temp = tempfile.mkdtemp(prefix="rayjob", dir="/tmp")
    head = subprocess.Popen([ray_bin, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
                             "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={agent}",
                             f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env}",
                             f"--metrics-export-port={metrics}", f"--temp-dir={temp}"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        _wait_for_dashboard(dashboard, head)
        command = [ray_bin, "job", "submit", f"--address=http://127.0.0.1:{dashboard}", "--working-dir", str(REPO),
                   "--", "python", "jobs/train.py", *overrides, f"train.storage_path={tmp_path / 'runs'}",
                   "train.name=job"]
        for _ in range(30):  # the dashboard answers before its job agent is up
            submit = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
            if "No available agent to submit job" not in submit.stderr:
                break
            time.sleep(2)
        output = submit.stdout + submit.stderr
        assert submit.returncode == 0, output[-4000:]
        assert "succeeded" in output
        assert f"best checkpoint: {tmp_path / 'runs' / 'job' / 'best'}" in output.replace("\n", "")
        assert (tmp_path / "runs" / "job" / "best" / "meta.json").is_file()
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
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
