"""A tiny two-category task where the categories prefer opposite things: what a single reward model
trained on everything struggles with (multi-task interference) and DMoERM's router + experts handle."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
WORDS = ["garden", "cake", "bike", "tax", "gift", "cat", "printer", "essay", "train", "phone", "budget", "song"]


def write_task(folder: Path, n: int = 150) -> dict[str, str]:
    """alpha prompts prefer the 'apple' answer, beta prompts prefer the 'banana' answer (rank 1 = best)."""
    paths = {}
    for cat, good, bad in (("alpha", "apple", "banana"), ("beta", "banana", "apple")):
        rows = []
        for i in range(n):
            w = WORDS[i % len(WORDS)]
            rows.append({"id": f"{cat}-{i}", "category": cat,
                         "context": [{"role": "user", "content": f"{cat} {cat} question {i} about my {w}"}],
                         "responses": [f"the {w} {bad} answer {i % 7}", f"the {w} {good} answer {i % 5}"],
                         "ranks": [2, 1]})
        paths[cat] = str(folder / f"{cat}.jsonl")
        Path(paths[cat]).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def write_config(folder: Path, base: str, data: dict[str, str], storage: str, tracking: str | None,
                 name: str = "tiny-dmoerm") -> str:
    cfg = {
        "name": name, "seed": 0,
        "taxonomy": [{"name": "alpha", "capabilities": ["alpha_taste"]},
                     {"name": "beta", "capabilities": ["beta_taste"]}],
        "data": {"sources": [{"path": data["alpha"], "format": "dmoerm"}, {"path": data["beta"], "format": "dmoerm"}],
                 "splits": {"phase1": 0.4, "phase3": 0.2, "val": 0.1, "test": 0.3}},
        "labels": {"source": "dataset", "datasets": {"alpha_taste": [{"path": data["alpha"], "format": "dmoerm"}],
                                                     "beta_taste": [{"path": data["beta"], "format": "dmoerm"}]}},
        "model": {"base": base, "top_layers": 1, "max_length": 32, "feature_batch_size": 16,
                  "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
        "router": {"train": {"lr": 0.01, "epochs": 30, "batch_size": 16, "patience": 10}},
        "phase1": {"lr": 5e-3, "epochs": 3, "batch_size": 16, "patience": 3},
        "phase2": {"lr": 5e-3, "epochs": 3, "batch_size": 16, "patience": 3},
        "phase3": {"lr": 3e-3, "epochs": 20, "batch_size": 16, "patience": 5},
        "platform": {"storage_uri": storage, "experiment": "tiny",
                     "tune": {"num_samples": 3, "max_concurrent": 2, "max_epochs": 8, "grace_period": 2,
                              "lr": [1e-3, 1e-2], "hidden_sizes": [16, 32]},
                     "promotion": {"num_bootstrap": 500}},
    }
    if tracking:
        cfg["platform"]["mlflow_tracking_uri"] = tracking
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def run_job(config: str, *args: str, env: dict | None = None, timeout: int = 600) -> dict:
    """``python -m jobs.run_pipeline`` as a user runs it; returns its RESULT line."""
    out = subprocess.run([sys.executable, "-m", "jobs.run_pipeline", "--config", config, "--num-cpus", "2", *args],
                         cwd=REPO, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):]) | {"stdout": out.stdout}


@contextlib.contextmanager
def ray_head(extra_env: dict[str, str] | None = None) -> Iterator[tuple[str, Path]]:
    """A Ray head started the way a user or operator starts one (``ray start --head`` from the activated
    virtual environment, so jobs run its ``python``), with ``extra_env`` in the node's environment; yields
    (dashboard address, its temp dir) and stops it, with every daemon it spawned, afterwards."""
    import httpx
    import pytest
    from services import free_port

    temp = tempfile.mkdtemp(prefix="rh-", dir="/tmp")  # short: Ray's unix sockets live under it
    port, dash = free_port(), free_port()
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = {**os.environ, "PATH": path, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           **(extra_env or {})}
    proc = subprocess.Popen([ray_bin, "start", "--head", "--block", "--port", str(port), "--num-cpus", "2",
                             "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                             "--dashboard-port", str(dash), "--temp-dir", temp, "--disable-usage-stats"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                if httpx.get(f"{address}/api/version", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        else:
            pytest.fail("ray head did not start in 90 s")
        yield address, Path(temp)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run(["pkill", "-9", "-f", temp], check=False)  # daemons that left the process group
        shutil.rmtree(temp, ignore_errors=True)


def files_holding(folder: Path, needles: list[str], skip: tuple[str, ...] = ()) -> list[str]:
    """``file: needle`` for every file under ``folder`` (not under a part named in ``skip``) holding a needle."""
    hits = []
    for p in folder.rglob("*"):
        if not p.is_file() or p.is_symlink() or any(part in skip for part in p.parts):
            continue
        try:
            blob = p.read_bytes()
        except OSError:
            continue
        hits += [f"{p}: {n}" for n in needles if n.encode() in blob]
    return hits
