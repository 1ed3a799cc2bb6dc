"""The whole pipeline as a Ray job on a tiny model, against a real `mlflow server` and a moto S3 server:
registers and promotes; a re-run skips every stage; a killed expert worker resumes from its checkpoint;
a deliberately worse candidate is refused; rollback restores the previous champion."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pipeline_fixtures import REPO, run_job, write_config, write_task

from dmoerm.training.loop import KILL_WORKER_ENV

pytestmark = [pytest.mark.ray, pytest.mark.integration, pytest.mark.slow]
FAIL_AT = 12  # an optimiser step in epoch 2 (epochs of ~7 steps): after the first epoch's checkpoint


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_bert_dir, s3_server, mlflow_server):
    folder = tmp_path_factory.mktemp("job")
    data = write_task(folder)
    s3_server.create_bucket("dmoerm-test")
    config = write_config(folder, tiny_bert_dir, data, "s3://dmoerm-test/pipeline", mlflow_server.tracking_uri)
    env = {"DMOERM_LOCAL_CACHE": str(folder / "stage-cache")}
    first = run_job(config, env={**env, KILL_WORKER_ENV: f"alpha/expert/alpha_taste:{FAIL_AT}"})
    return {"config": config, "env": env, "first": first, "tracking": mlflow_server.tracking_uri, "folder": folder}


def test_first_run_registers_and_promotes_over_the_baseline(job):
    from mlflow import MlflowClient

    first = job["first"]
    assert str(first["version"]) == "1" and first["promoted"] is True, first["stdout"][-2000:]
    assert all(first["ran"].values()), first["ran"]
    client = MlflowClient(job["tracking"])
    assert client.get_model_version_by_alias("tiny-dmoerm", "champion").version == "1"
    run = client.get_run(first["run_id"])
    assert run.data.metrics["dmoerm.acc.overall"] > run.data.metrics["baseline.acc.overall"]
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{first['run_id']}'")
    names = {c.info.run_name for c in children}
    assert {"data", "route", "labels", "trunk", "experts/alpha/alpha_taste", "search/alpha", "search/baseline",
            "evaluate"} <= names
    # The single RM was tuned with the same budget as each aggregator, and the report says so.
    trials = {c.info.run_name: c.data.metrics.get("trials") for c in children if c.info.run_name.startswith("search/")}
    assert len(set(trials.values())) == 1, trials
    artifacts = {a.path for a in client.list_artifacts(first["run_id"], "plots")}
    assert {"plots/router_confusion.png", "plots/accuracy_by_category.png"} <= artifacts


def test_killed_expert_worker_resumes_from_its_checkpoint(job):
    info = job["first"]["experts"]["alpha/alpha_taste"]
    # The worker died at step FAIL_AT (epoch 2); its replacement started from the epoch-1 checkpoint (a
    # fresh start would report 0, and no failure would mean no resume).
    assert 0 < info["resumed_from_step"] < FAIL_AT, info
    assert info["steps"] > info["resumed_from_step"]
    assert job["first"]["experts"]["beta/beta_taste"]["resumed_from_step"] == 0


def test_champion_scores_through_mlflow_pyfunc(job):
    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(job["tracking"])
    model = mlflow.pyfunc.load_model("models:/tiny-dmoerm@champion")
    df = pd.DataFrame({"context": ["alpha alpha question 3 about my cake"] * 2,
                       "response": ["the cake apple answer 1", "the cake banana answer 1"]})
    out = model.predict(df)
    assert list(out["category"]) == ["alpha", "alpha"]
    assert out["reward"][0] > out["reward"][1]  # alpha prefers apple


def test_rerun_skips_every_stage(job):
    again = run_job(job["config"], env=job["env"])
    assert str(again["version"]) == "1"
    assert not any(again["ran"].values()), again["ran"]


def test_worse_candidate_is_refused_and_rollback_restores_the_champion(job):
    from mlflow import MlflowClient

    # A deliberately broken aggregator search (no learning) makes a worse model from the same experts.
    worse = run_job(job["config"], "platform.tune.lr=[1e-9, 1e-9]", "phase3.lr=1e-9", env=job["env"])
    assert str(worse["version"]) == "2" and worse["promoted"] is False
    ran = worse["ran"]
    assert not ran["trunk"] and not ran["experts/alpha/alpha_taste"] and ran["search/alpha"] and ran["evaluate"]
    client = MlflowClient(job["tracking"])
    v2 = client.get_model_version("tiny-dmoerm", "2")
    assert v2.tags["dmoerm.promotion.decision"] == "refused" and v2.tags["dmoerm.promotion.reason"]
    assert client.get_model_version_by_alias("tiny-dmoerm", "champion").version == "1"

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dmoerm.cli", *args, "--tracking-uri", job["tracking"]],
                              cwd=REPO, capture_output=True, text=True, timeout=120)

    refused = cli("promote", "--name", "tiny-dmoerm", "--version", "2")
    assert refused.returncode == 1 and "refused" in refused.stdout
    forced = cli("promote", "--name", "tiny-dmoerm", "--version", "2", "--force")
    assert forced.returncode == 0, forced.stderr
    assert client.get_model_version_by_alias("tiny-dmoerm", "champion").version == "2"
    back = cli("rollback", "--name", "tiny-dmoerm")
    assert back.returncode == 0, back.stderr
    assert client.get_model_version_by_alias("tiny-dmoerm", "champion").version == "1"
