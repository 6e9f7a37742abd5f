"""``jointray serve`` as a user runs it: up until interrupted, then Serve shut down cleanly."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from jointray.serve.app import free_port, wait_until_healthy


def test_jointray_serve_answers_until_interrupted_then_shuts_down(msd_checkpoint, tmp_path):
    import ray

    port = free_port(0)
    # The command joins this session's Ray instance (as `ray job submit` would) instead of starting another.
    env = os.environ | {"RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    command = [str(Path(sys.executable).parent / "jointray"), "serve", "--checkpoint", str(msd_checkpoint), "--port",
               str(port), "inference.mc_samples=2"]
    log = (tmp_path / "serve.log").open("w")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}", timeout_s=180)
        info = requests.get(f"http://127.0.0.1:{port}/v1/model", timeout=30).json()
        assert info["mc"]["samples"] == 2  # the override reached the server
        deadline = time.monotonic() + 60
        while "Ctrl-C stops" not in " ".join((tmp_path / "serve.log").read_text().split()):
            assert time.monotonic() < deadline, "the command never said where it serves"
            time.sleep(0.5)
        process.send_signal(signal.SIGINT)  # Ctrl-C
        assert process.wait(timeout=120) == 0, (tmp_path / "serve.log").read_text()[-3000:]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    output = " ".join((tmp_path / "serve.log").read_text().split())  # rich wraps lines at 80 columns
    assert f"at http://127.0.0.1:{port}" in output and "shutting down" in output
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the HTTP proxy is gone with Serve
        try:
            requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
        except requests.ConnectionError:
            return
        time.sleep(1)
    raise AssertionError(f"port {port} still answers after the server was interrupted")


def test_bad_serve_requests_fail_before_ray_starts(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from jointray.cli import app

    def refuse(*_args, **_kwargs):
        raise AssertionError("the command started Ray")

    monkeypatch.setattr("jointray.runtime.init_ray", refuse)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["serve", "--checkpoint", "nothing"])
    assert result.exit_code == 2 and " ".join(result.output.split()) == "error: --checkpoint nothing does not exist"
    (tmp_path / "runs").mkdir()  # runs/<name> where runs/<name>/best was meant
    result = CliRunner().invoke(app, ["serve", "--checkpoint", "runs"])
    assert result.exit_code == 2 and "runs: not a complete jointray checkpoint" in " ".join(result.output.split())
