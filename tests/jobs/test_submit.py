"""`dmoerm submit pipeline` against a local `ray start --head` cluster through Ray's job API."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from pipeline_fixtures import REPO, ray_head, write_config, write_task

pytestmark = [pytest.mark.ray, pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def ray_head_address():
    with ray_head() as (address, _):
        yield address


def test_submit_streams_the_job_and_reports_the_run(ray_head_address, tmp_path, tiny_bert_dir):
    data = write_task(tmp_path, n=60)
    config = write_config(tmp_path, tiny_bert_dir, data, str(tmp_path / "storage"), None, name="submitted")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}

    def cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dmoerm.cli", *args], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=timeout)

    out = cli("submit", "pipeline", "--config", config, "--address", ray_head_address, "platform.tune.num_samples=2")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    job_id = re.search(r"submitted job (\S+)", out.stdout).group(1)
    assert "registered submitted version 1" in out.stdout
    assert re.search(r"MLflow run: [0-9a-f]{32}", out.stdout)
    assert f"job {job_id}: SUCCEEDED" in out.stdout
    status = cli("status", job_id, "--address", ray_head_address, timeout=60)
    assert "SUCCEEDED" in status.stdout, status.stderr
    logs = cli("logs", job_id, "--address", ray_head_address, timeout=60)
    assert "RESULT {" in logs.stdout
    # the job wrote to the storage the config named (made absolute before it travelled)
    assert (tmp_path / "storage" / "stages" / "evaluate").is_dir()
