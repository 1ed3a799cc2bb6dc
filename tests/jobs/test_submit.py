"""`dmoerm submit pipeline` against a local `ray start --head` cluster through Ray's job API."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import pytest
from pipeline_fixtures import REPO, write_config, write_task

pytestmark = [pytest.mark.ray, pytest.mark.integration, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head started the way a user starts one; stopped (with every daemon it spawned) afterwards."""
    temp = tempfile.mkdtemp(prefix="rh-", dir="/tmp")  # short: Ray's unix sockets live under it
    port, dash = _free_port(), _free_port()
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    # As a user starts it: from the activated virtual environment, so jobs run its `python`.
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = {**os.environ, "PATH": path, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen([ray_bin, "start", "--head", "--block", "--port", str(port), "--num-cpus", "2",
                             "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                             "--dashboard-port", str(dash), "--temp-dir", temp, "--disable-usage-stats"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            if httpx.get(f"{address}/api/version", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(1)
    else:
        proc.kill()
        pytest.fail("ray head did not start in 90 s")
    yield address
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    subprocess.run(["pkill", "-9", "-f", temp], check=False)  # daemons that left the process group


def test_submit_streams_the_job_and_reports_the_run(ray_head, tmp_path, tiny_bert_dir):
    data = write_task(tmp_path, n=60)
    config = write_config(tmp_path, tiny_bert_dir, data, str(tmp_path / "storage"), None, name="submitted")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}

    def cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dmoerm.cli", *args], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=timeout)

    out = cli("submit", "pipeline", "--config", config, "--address", ray_head, "platform.tune.num_samples=2")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    job_id = re.search(r"submitted job (\S+)", out.stdout).group(1)
    assert "registered submitted version 1" in out.stdout
    assert re.search(r"MLflow run: [0-9a-f]{32}", out.stdout)
    assert f"job {job_id}: SUCCEEDED" in out.stdout
    status = cli("status", job_id, "--address", ray_head, timeout=60)
    assert "SUCCEEDED" in status.stdout, status.stderr
    logs = cli("logs", job_id, "--address", ray_head, timeout=60)
    assert "RESULT {" in logs.stdout
    # the job wrote to the storage the config named (made absolute before it travelled)
    assert (tmp_path / "storage" / "stages" / "evaluate").is_dir()
