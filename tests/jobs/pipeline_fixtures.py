"""A tiny two-category task where the categories prefer opposite things: what a single reward model
trained on everything struggles with (multi-task interference) and DMoERM's router + experts handle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
