"""No secret leaves the environment it lives in: a submitted job reads the judge's key from the cluster's
environment (never from ``runtime_env``, which Ray shows in the job info), credentials inside URLs are
masked in logs and MLflow, and ``judge.max_tokens`` is a parameter like any other."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fake_judge import FakeJudge, per_capability, prefer_marker
from pipeline_fixtures import REPO, files_holding, ray_head, write_config, write_task

from dmoerm.labeling import JudgeConfig
from dmoerm.redact import redact_credentials
from dmoerm.submit import forwarded_env, withheld_env
from dmoerm.tracking import flatten_params

CLUSTER_KEY = "sk-cluster-judge-key-71c9a4"  # set on the cluster's nodes only
DECOY_KEY = "sk-submitter-judge-key-0b7e55"  # the same variable on the submitting machine: must stay there
AWS_SECRET = "planted-aws-secret-e4a1d2"
AWS_KEY_ID = "AKIAPLANTEDKEYID0001"
URL_PASS = "planted-url-pass-3f8b"


# ---------------------------------------------------------------------------------------- no Ray needed


def test_params_keep_max_tokens_and_mask_url_credentials():
    judge = JudgeConfig(base_url=f"https://judge-user:{URL_PASS}@judge.example/v1", model="m", max_tokens=8)
    params = flatten_params({"labels": {"judge": judge}, "api_key": "sk-x", "auth_token": "t",
                             "platform": {"mlflow_tracking_uri": f"https://u:{URL_PASS}@mlflow.example",
                                          "storage_uri": f"https://h/x?X-Amz-Signature={URL_PASS}"},
                             "model": {"tokenizer": "bert", "max_length": 32}})
    assert params["labels.judge.max_tokens"] == "8"
    assert params["labels.judge.api_key_env"] == "OPENAI_API_KEY"  # a NAME, kept
    assert params["labels.judge.base_url"] == "https://***@judge.example/v1"
    assert params["platform.mlflow_tracking_uri"] == "https://***@mlflow.example"
    assert params["model.tokenizer"] == "bert"
    assert "api_key" not in params and "auth_token" not in params
    assert not any(URL_PASS in v or "sk-x" in v for v in params.values())


def test_redaction_leaves_plain_urls_alone():
    for plain in ("http://127.0.0.1:8000/v1", "s3://bucket/key", "sqlite:////tmp/mlflow.db", "a@b.c"):
        assert redact_credentials(plain) == plain


def test_only_non_secret_variables_are_forwarded(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", AWS_KEY_ID)
    monkeypatch.setenv("OPENAI_API_KEY", DECOY_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", f"http://minio:{URL_PASS}@minio:9000")
    env = forwarded_env()
    assert env.get("AWS_DEFAULT_REGION") == "eu-west-1"
    assert not any(s in v for v in env.values() for s in (AWS_SECRET, AWS_KEY_ID, DECOY_KEY, URL_PASS))
    withheld = withheld_env(["DMOERM_TEST_JUDGE_KEY"])
    assert {"AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "OPENAI_API_KEY", "MLFLOW_S3_ENDPOINT_URL"} <= set(withheld)
    assert "DMOERM_TEST_JUDGE_KEY" not in withheld  # not set here


@pytest.mark.ray
def test_a_local_ray_instance_gets_no_secret_in_its_runtime_env(monkeypatch):
    """``jobs.run_pipeline``'s local path: workers inherit the secrets, the runtime env holds none."""
    import ray

    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from jobs.run_pipeline import init_ray

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    init_ray(None, 1)
    try:
        runtime_env = ray.get_runtime_context().runtime_env
        assert AWS_SECRET not in repr(runtime_env)

        @ray.remote(num_cpus=0)
        def worker_env() -> str | None:
            return os.environ.get("AWS_SECRET_ACCESS_KEY")

        assert ray.get(worker_env.remote()) == AWS_SECRET  # inherited from the process that started Ray
    finally:
        ray.shutdown()


# ------------------------------------------------------------------------------------- a submitted job
@pytest.fixture(scope="module")
def secret_cluster():
    """A Ray head started as an operator starts one, with the judge's key in the nodes' environment."""
    with ray_head({"DMOERM_TEST_JUDGE_KEY": CLUSTER_KEY}) as (address, temp):
        yield address, temp


def _mlflow_text(tracking_uri: str, experiment: str, download_to: Path) -> str:
    """Every param, tag and artifact (downloaded) of every run of ``experiment``, and every model version."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    parts = []
    for run in client.search_runs([exp.experiment_id], max_results=1000):
        parts += [repr(run.data.params), repr(run.data.tags), repr(run.info)]
        dest = download_to / run.info.run_id
        dest.mkdir(parents=True)
        client.download_artifacts(run.info.run_id, "", str(dest))
    for mv in client.search_model_versions():
        parts += [repr(mv.tags), str(mv.description), str(mv.source)]
    return "\n".join(parts)


@pytest.mark.ray
@pytest.mark.integration
@pytest.mark.slow
def test_submitted_judge_job_reads_its_key_from_the_cluster_and_leaks_nothing(secret_cluster, mlflow_server,
                                                                               tmp_path, tiny_bert_dir):
    from ray.job_submission import JobSubmissionClient

    address, ray_temp = secret_cluster
    with FakeJudge(per_capability({"alpha_taste": prefer_marker("apple"),
                                   "beta_taste": prefer_marker("banana")})) as judge:
        data = write_task(tmp_path, n=60)
        config = Path(write_config(tmp_path, tiny_bert_dir, data, str(tmp_path / "storage"),
                                   mlflow_server.tracking_uri, name="secretive"))
        cfg = yaml.safe_load(config.read_text())
        cfg["output_dir"] = str(tmp_path / "out")
        cfg["platform"]["experiment"] = "secretive"
        cfg["platform"]["s3_endpoint_url"] = f"http://s3-user:{URL_PASS}@127.0.0.1:9"  # never used: local storage
        cfg["labels"] = {"source": "judge", "judge": {"base_url": judge.url, "model": "fake-judge", "concurrency": 4,
                                                      "api_key_env": "DMOERM_TEST_JUDGE_KEY"}}
        config.write_text(yaml.safe_dump(cfg))
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "DMOERM_TEST_JUDGE_KEY": DECOY_KEY,
               "AWS_SECRET_ACCESS_KEY": AWS_SECRET, "AWS_ACCESS_KEY_ID": AWS_KEY_ID}
        out = subprocess.run([sys.executable, "-m", "dmoerm.cli", "submit", "pipeline", "--config", str(config),
                              "--address", address, "platform.tune.num_samples=2"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        job_id = re.search(r"submitted job (\S+)", out.stdout).group(1)
        assert f"job {job_id}: SUCCEEDED" in out.stdout, out.stdout[-3000:]
        # dmoerm submit says what it withheld, and the job used the cluster's key, not the submitter's
        withheld = re.search(r"not forwarded to the job.*?: (.*?)\. ", out.stdout).group(1)
        assert {"AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "DMOERM_TEST_JUDGE_KEY"} <= set(withheld.split(", "))
        assert judge.total_answered > 0 and set(judge.auth_headers) == {f"Bearer {CLUSTER_KEY}"}

    planted = [CLUSTER_KEY, DECOY_KEY, AWS_SECRET, AWS_KEY_ID, URL_PASS]
    client = JobSubmissionClient(address)
    info = client.get_job_info(job_id)
    job_info = " ".join(map(repr, (info, info.runtime_env, info.metadata, info.entrypoint)))
    logs = client.get_job_logs(job_id)
    mlflow_text = _mlflow_text(mlflow_server.tracking_uri, "secretive", tmp_path / "artifacts")
    found = {"job info": [s for s in planted if s in job_info],
             "job logs": [s for s in planted if s in logs],
             "dmoerm submit output": [s for s in planted if s in out.stdout + out.stderr],
             "MLflow params/tags/model versions": [s for s in planted if s in mlflow_text],
             "MLflow artifacts, storage, output": files_holding(tmp_path, planted, skip=(config.name,)),
             # Ray's own logs; the job's uploaded files (its config) are the job's, not a log
             "Ray session logs": files_holding(ray_temp, planted, skip=("runtime_resources",))}
    assert found == {k: [] for k in found}
    assert "'labels.judge.max_tokens': '8'" in mlflow_text
    assert "'platform.s3_endpoint_url': 'http://***@127.0.0.1:9'" in mlflow_text
