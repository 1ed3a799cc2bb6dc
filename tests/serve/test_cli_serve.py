"""`dmoerm serve` as a user runs it: a bundle folder served on a local Ray instance, a curl-equivalent call,
Ctrl-C; it prints the URL and a curl command, and none of Ray's own log lines."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from serve_fixtures import REPO, make_bundle
from services import free_port

from dmoerm.data.records import Turn

pytestmark = [pytest.mark.ray, pytest.mark.integration, pytest.mark.slow]


def test_dmoerm_serve_starts_scores_and_stops(tmp_path, tiny_bert_dir):
    from dmoerm.bundle import load_bundle

    bundle = make_bundle(tmp_path, tiny_bert_dir, seed=3)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "DMOERM_SERVE_TOKEN")}
    cli = Path(sys.executable).with_name("dmoerm")
    proc = subprocess.Popen([str(cli), "serve", "--model", bundle, "--port", str(port), "--num-cpus", "2"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []
    try:
        deadline = time.time() + 240
        while not any(ln.startswith("curl ") for ln in lines):
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                raise AssertionError("dmoerm serve exited:\n" + "".join(lines))
            lines.append(line)
            assert time.time() < deadline, "".join(lines)
        assert f"serving {bundle} at http://127.0.0.1:{port}" in "".join(lines)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/reward", json={"prompt": "hello?", "responses": ["hi!", "no"]},
                       timeout=60)
        assert r.status_code == 200, r.text
        want = load_bundle(bundle).model.score([[Turn("user", "hello?")]] * 2, ["hi!", "no"])
        assert r.json()["rewards"] == pytest.approx([s.reward for s in want], abs=1e-5)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
        lines.append(out)
    text = "".join(lines)
    assert proc.returncode == 0, text
    assert "(ServeReplica" not in text and "INFO" not in text, text  # Ray's logs stay in its log files
    assert str(REPO)  # the CLI found the repo's serve/ layer
