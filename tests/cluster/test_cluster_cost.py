"""cluster/cost.py on runs in a real `mlflow server`, written by the job's own writer (dmoerm.tracking's
Tracker: the parent run with the config as params, a child run per stage and per expert): GPU-hours are each
expert's measured seconds times its workers' GPUs, zero on CPU, stages without a measured time are named."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.cost import format_cost, run_cost

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _pipeline_run(uri: str, use_gpu: bool, workers: int = 2) -> str:
    """A finished pipeline run as jobs/run_pipeline.py records one (through the same Tracker calls)."""
    from dmoerm.config import load_config
    from dmoerm.tracking import Tracker

    cfg = load_config(REPO / "configs" / "demo.yaml", [f"platform.expert_resources.use_gpu={str(use_gpu).lower()}",
                                                       f"platform.expert_resources.num_workers={workers}"])
    tracker = Tracker(uri, "cost-test", run_name=f"cost-{use_gpu}")
    tracker.log_params(tracker.run_id, cfg)
    tracker.log_stage("data", "k0", {"rows": 100}, True)
    tracker.log_stage("phase1/helpful", "k1", {"val_accuracy": 0.6, "steps": 10}, True)
    search = tracker.child("search/helpful")
    tracker.log_stage("search/helpful", "k2", {"best_val_accuracy": 0.7, "trials": 6}, True, search)
    # what the job's RayExecutor hands to log_expert: the DONE info with the expert's share of its group's time
    tracker.log_expert("experts/helpful/helpfulness", "k3", {"seconds": 1800.0, "workers": workers,
                                                            "val_accuracy": 0.7}, True)
    tracker.log_expert("experts/helpful/harmlessness", "k4", {"seconds": 900.0, "workers": workers,
                                                             "val_accuracy": 0.7}, True)
    tracker.log_expert("experts/red_team/helpfulness", "k5", {"seconds": 0.0, "workers": None}, False)  # earlier run's
    tracker.log_metrics(tracker.run_id, {"pipeline_seconds": 5400.0})
    tracker.finish(tracker.run_id)
    return tracker.run_id


def test_gpu_hours_are_expert_seconds_times_their_gpus(mlflow_server):
    from mlflow import MlflowClient

    uri = mlflow_server.tracking_uri
    run_id = _pipeline_run(uri, use_gpu=True, workers=2)
    cost = run_cost(MlflowClient(uri), run_id)
    assert cost.gpu_hours == pytest.approx((1800 + 900) * 2 / 3600)  # 1.5
    by_name = {s.name: s for s in cost.stages}
    assert set(by_name) == {"data", "phase1/helpful", "search/helpful", "experts/helpful/helpfulness",
                            "experts/helpful/harmlessness", "experts/red_team/helpfulness"}
    assert by_name["experts/helpful/helpfulness"].gpus == 2 and by_name["experts/helpful/helpfulness"].seconds == 1800
    assert by_name["data"].seconds is None and by_name["data"].gpus == 0  # recorded after it ran: not measured
    assert by_name["search/helpful"].seconds is not None and by_name["search/helpful"].gpus == 0
    assert cost.unmeasured_gpu_stages == []
    text = format_cost(cost, cluster_gpus=8, usd=2.0)
    assert "GPU-hours reserved by the run's stages: 1.500 ($3.00)" in text
    assert "holding 8 GPUs for the whole run: 12.000 GPU-hours ($24.00)" in text


def test_a_cpu_run_costs_no_gpu_hours_and_the_cli_says_so(mlflow_server):
    uri = mlflow_server.tracking_uri
    run_id = _pipeline_run(uri, use_gpu=False)
    out = subprocess.run([sys.executable, "-m", "cluster.cost", run_id, "--tracking-uri", uri, "--json"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["gpu_hours"] == 0 and report["pipeline_seconds"] == 5400 and not report["lower_bound"]


def test_a_logged_gpus_figure_wins_and_a_non_pipeline_run_is_refused(mlflow_server):
    from mlflow import MlflowClient

    from dmoerm.tracking import Tracker

    uri = mlflow_server.tracking_uri
    run_id = _pipeline_run(uri, use_gpu=False)
    tracker = Tracker(uri, "cost-test", parent_run_id=run_id)
    tracker.log_stage("features/helpful", "k6", {"seconds": 360.0, "gpus": 1}, True)  # a stage that logs both
    assert run_cost(MlflowClient(uri), run_id).gpu_hours == pytest.approx(0.1)
    stray = MlflowClient(uri).create_run(tracker.experiment_id, run_name="not-a-pipeline").info.run_id
    out = subprocess.run([sys.executable, "-m", "cluster.cost", stray, "--tracking-uri", uri], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "not a pipeline run of jobs.run_pipeline" in out.stderr
