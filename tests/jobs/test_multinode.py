"""Several Ray nodes on one machine (``ray.cluster_utils.Cluster``): a head without the expert resource and
two worker nodes with one ``gpu_type_a`` each (a custom resource standing in for a GPU type). The whole
pipeline job runs against that cluster, each expert its own TorchTrainer asking for ``gpu_type_a``; while
both experts train (each has written a checkpoint, on different nodes), the node of one of them is removed.
The job still finishes: Ray Train restarts that expert's worker group on the remaining node, from its last
checkpoint, and the job's report says where every expert trained."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from pipeline_fixtures import REPO, write_config, write_task

pytestmark = [pytest.mark.ray, pytest.mark.slow]
EPOCHS = 20  # ~2 s each (a checkpoint reported per epoch): a window to remove a node in while both train


def _checkpoints(root: Path, category: str) -> list[dict]:
    """The expert.json of every checkpoint the trainer of ``category``'s expert has written so far."""
    out = []
    for f in root.glob(f"ray_train/expert-{category}-*/checkpoint_*/expert.json"):
        with contextlib.suppress(OSError, ValueError):  # being written
            out.append(json.loads(f.read_text()))
    return out


@pytest.fixture
def cluster(monkeypatch):
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(":"))
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    workers = [c.add_node(num_cpus=1, resources={"gpu_type_a": 1}) for _ in range(2)]
    c.wait_for_nodes()
    try:
        yield c, workers
    finally:
        c.shutdown()


def test_experts_spread_over_nodes_and_survive_losing_one(cluster, tmp_path, tiny_bert_dir):
    c, workers = cluster
    storage = tmp_path / "storage"
    config = Path(write_config(tmp_path, tiny_bert_dir, write_task(tmp_path, n=60), str(storage), None,
                               name="multinode"))
    raw = yaml.safe_load(config.read_text())
    raw["phase2"].update(epochs=EPOCHS, patience=EPOCHS)
    raw["platform"]["tune"]["enabled"] = False
    raw["platform"]["expert_resources"] = {"group": "expert", "resources": {"gpu_type_a": 1}, "max_failures": 3}
    config.write_text(yaml.safe_dump(raw))
    job = subprocess.Popen([sys.executable, "-m", "jobs.run_pipeline", "--config", str(config), "--address",
                            c.address], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, seen = time.time() + 400, {}
        while time.time() < deadline and job.poll() is None:
            seen = {cat: _checkpoints(storage, cat) for cat in ("alpha", "beta")}
            done = list(storage.glob("stages/experts/*/DONE.json"))
            # a few of alpha's: Ray Train registers a reported checkpoint asynchronously, a while after it is written
            if (len(seen["alpha"]) >= 3 and seen["beta"]) or done:
                break
            time.sleep(0.2)
        assert not done and seen["beta"], f"both experts never trained at once: {seen}, job rc {job.poll()}"
        where = {cat: {ck["node_id"] for ck in cks} for cat, cks in seen.items()}
        nodes = {w.node_id: w for w in workers}
        assert all(len(n) == 1 and n <= set(nodes) for n in where.values()), where  # on gpu_type_a nodes only
        assert where["alpha"] != where["beta"], where  # spread: one expert per node
        [removed] = where["alpha"]
        c.remove_node(nodes[removed], allow_graceful=False)  # alpha's node, while alpha trains
        out, _ = job.communicate(timeout=max(60, deadline - time.time()))
        print(out[-3000:])
    finally:
        if job.poll() is None:
            job.kill()
            job.communicate()
    assert job.returncode == 0, out[-6000:]
    result = json.loads(next(x for x in out.splitlines() if x.startswith("RESULT "))[len("RESULT "):])
    alpha, beta = result["experts"]["alpha/alpha_taste"], result["experts"]["beta/beta_taste"]
    [survivor] = set(nodes) - {removed}
    # alpha resumed from a checkpoint on the remaining node (a fresh start would report 0); beta was untouched
    assert alpha["node_id"] == survivor and alpha["resumed_from_step"] > 0, alpha
    assert beta["node_id"] == survivor and beta["resumed_from_step"] == 0, beta
    assert alpha["steps"] > alpha["resumed_from_step"] and result["evaluation"], result
