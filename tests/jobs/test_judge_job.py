"""The LLM-judge path end to end against a real local chat-completions server (tests/fake_judge.py):
``jobs/label_judge.py``'s RayLabeler on a local Ray instance (resized re-runs re-ask nothing, the cache on
local or S3 storage), the whole pipeline as a Ray job with ``labels.source: judge``, and the labeling
command with ``labels.source: attributes``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from fake_judge import FakeJudge, per_capability, prefer_marker
from pipeline_fixtures import REPO, files_holding, write_config, write_task

from dmoerm.data.records import Sample, Turn
from dmoerm.labeling import JudgeConfig
from dmoerm.labeling.cache import count_answers

CAPS = {"chat": ["detail", "tone"]}
JUDGE_KEY = "sk-planted-judge-key-5d1f0e"  # must reach the judge, and nothing else


def samples(ids: range) -> list[Sample]:
    return [Sample(id=f"s{k}", context=[Turn("user", f"question {k}")], category="chat", ranks=[1, 2, 3],
                   responses=["x" * (k + 1), "y" * (k + 3), "z" * (k + 2)]) for k in ids]


def repeated(judge: FakeJudge) -> int:
    """Questions the judge answered more than once: paid twice."""
    return sum(n - 1 for n in judge.answered.values())


@pytest.fixture(scope="module")
def local_ray(s3_server, tmp_path_factory):
    """A local Ray instance whose workers see moto's S3 endpoint and a node-local cache folder."""
    import ray

    mirror = tmp_path_factory.mktemp("node-local")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DMOERM_LOCAL_CACHE", str(mirror))
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
        try:
            yield mirror
        finally:
            ray.shutdown()


@pytest.fixture
def judge():
    with FakeJudge() as server:
        yield server


def _cfg(judge: FakeJudge, cache: str) -> JudgeConfig:
    return JudgeConfig(base_url=judge.url, model="fake-judge", concurrency=4, timeout_s=10.0, backoff_s=0.01,
                       cache_path=cache)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
def test_resized_rerun_with_new_samples_asks_no_question_twice(local_ray, judge, s3_server, tmp_path, where):
    if str(REPO) not in sys.path:  # jobs/ is the checkout's Ray layer, not an installed package
        sys.path.insert(0, str(REPO))
    from jobs.label_judge import RayLabeler

    if where == "s3":
        cache = f"s3://{s3_server.create_bucket('judge-job')}/{tmp_path.name}/judge-cache"
    else:
        cache = str(tmp_path / "judge-cache")
    cfg = _cfg(judge, cache)
    first = samples(range(12))
    totals = RayLabeler(num_workers=2)(first, CAPS, cfg)  # 12 samples x 2 caps x 3 pairs x 2 orders
    assert (totals.asked, judge.total_answered) == (144, 144)
    assert count_answers(cache) == 144
    if where == "s3":  # the next shards land on "other nodes": nothing of this node's mirror survives
        shutil.rmtree(local_ray)
    second = samples(range(13))[::-1]  # one more sample, another order, three workers
    totals = RayLabeler(num_workers=3)(second, CAPS, cfg)
    print(f"judge job: repeated questions after a resized re-run ({where} cache): {repeated(judge)}")
    assert repeated(judge) == 0, "paid questions were asked again"
    assert (totals.asked, totals.cache_hits, getattr(totals, "workers", None)) == (12, 144, 3)
    assert all(sorted(s.capability_prefs["detail"]) == [(1, 0), (1, 2), (2, 0)] for s in second)


# ---------------------------------------------------------------------------------- the whole pipeline


def _judge_config(folder: Path, base: str, judge: FakeJudge, **judge_fields) -> str:
    data = write_task(folder, n=60)
    path = write_config(folder, base, data, str(folder / "storage"), None, name="judged")
    cfg = yaml.safe_load(Path(path).read_text())
    cfg["output_dir"] = str(folder / "out")
    cfg["labels"] = {"source": "judge", "judge": {"base_url": judge.url, "model": "fake-judge", "concurrency": 4,
                                                  "api_key_env": "DMOERM_TEST_JUDGE_KEY", **judge_fields}}
    cfg["platform"]["tune"]["num_samples"] = 2
    Path(path).write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.ray
@pytest.mark.integration
@pytest.mark.slow
def test_pipeline_job_labels_with_the_judge(tmp_path, tiny_bert_dir, judge):
    judge.policy = per_capability({"alpha_taste": prefer_marker("apple"), "beta_taste": prefer_marker("banana")})
    config = _judge_config(tmp_path, tiny_bert_dir, judge)
    aws_secret = "planted-aws-secret-9c2e"
    ray_tmp = tempfile.mkdtemp(prefix="rj-", dir="/tmp")  # short: Ray's unix sockets live under it
    env = {**os.environ, "DMOERM_TEST_JUDGE_KEY": JUDGE_KEY, "AWS_SECRET_ACCESS_KEY": aws_secret,
           "RAY_TMPDIR": ray_tmp}
    try:
        out = subprocess.run([sys.executable, "-m", "jobs.run_pipeline", "--config", config, "--num-cpus", "2"],
                             cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
        result = json.loads(next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))[len("RESULT "):])
        assert result["ran"]["labels"] and result["ran"]["experts/alpha/alpha_taste"], result["ran"]
        # the labels came from the judge, every answer is stored under <storage_uri>/judge-cache
        [done] = (tmp_path / "storage" / "stages" / "labels").rglob("DONE.json")
        report = json.loads(done.read_text())["judge"]
        assert report["asked"] == judge.total_answered > 0 and report["consistent"] > 0, report
        assert count_answers(str(tmp_path / "storage" / "judge-cache")) == judge.total_answered
        assert repeated(judge) == 0
        trained = next((tmp_path / "storage" / "stages" / "labels").rglob("alpha*alpha_taste*train.jsonl"))
        first = json.loads(trained.read_text().splitlines()[0])
        assert first["capability_prefs"]["alpha_taste"] == [[1, 0]]  # the "apple" response, as the judge said
        # local Ray workers inherit the key from the process's environment: it reached the judge ...
        assert set(judge.auth_headers) == {f"Bearer {JUDGE_KEY}"}
        # ... and nothing else: not the output, the logs, MLflow's store and artifacts, nor Ray's session logs
        for text in (out.stdout, out.stderr):
            assert JUDGE_KEY not in text and aws_secret not in text
        assert files_holding(tmp_path, [JUDGE_KEY, aws_secret]) == []
        # Ray's own logs: not the judge's key. (Ray Tune itself copies AWS_ACCESS_KEY_ID/_SECRET_ACCESS_KEY/
        # _SESSION_TOKEN from the driver's environment into its trial actors' runtime_env, which Ray's runtime
        # env agent logs: ray/tune/execution/class_cache.py; the README says to give S3 credentials by role.)
        assert files_holding(Path(ray_tmp), [JUDGE_KEY]) == []
        # a re-run asks nothing
        before = judge.total_answered
        again = subprocess.run([sys.executable, "-m", "jobs.run_pipeline", "--config", config, "--num-cpus", "2"],
                               cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
        assert again.returncode == 0, again.stderr[-3000:]
        assert judge.total_answered == before
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_label_command_with_attribute_ratings(tmp_path, tiny_bert_dir):
    data = write_task(tmp_path, n=30)
    config = Path(write_config(tmp_path, tiny_bert_dir, data, str(tmp_path / "storage"), None))
    ratings = tmp_path / "ratings.jsonl"
    with ratings.open("w") as f:
        for cat, good in (("alpha", "apple"), ("beta", "banana")):
            for row in map(json.loads, Path(data[cat]).read_text().splitlines()):
                f.write(json.dumps({"id": row["id"], "ratings": {
                    f"{cat}_taste": [1.0 if good in r else 0.0 for r in row["responses"]]}}) + "\n")
    cfg = yaml.safe_load(config.read_text())
    cfg["labels"] = {"source": "attributes", "attributes_path": str(ratings)}
    config.write_text(yaml.safe_dump(cfg))
    out_path = tmp_path / "labelled.jsonl"
    out = subprocess.run([sys.executable, "-m", "dmoerm.cli", "label", "--config", str(config), "--output",
                          str(out_path)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(x) for x in out_path.read_text().splitlines()]
    assert rows and all(r["capability_prefs"] for r in rows)
    for r in rows:
        cap, pairs = next(iter(r["capability_prefs"].items()))
        better = r["responses"][pairs[0][0]]
        assert ("apple" if cap == "alpha_taste" else "banana") in better
