"""Registry helpers against real MLflow servers: register, promote, refuse, promote, roll back."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from test_promotion import outcomes

from dmoerm.promotion import PromotionConfig, decide
from dmoerm.registry import (
    PAIR_OUTCOMES_ARTIFACT,
    decide_against_champion,
    get_alias,
    get_history,
    load_pair_outcomes,
    promote,
    register_version,
    rollback,
)

pytestmark = pytest.mark.integration
CFG = PromotionConfig(num_bootstrap=500)
BASELINE = outcomes({"chat": 60, "code": 60, "math": 60})  # e.g. the base model on the evaluation pairs


def _client(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _train_run(client, experiment_id: str, tmp_path: Path, label: str) -> tuple[str, str]:
    """A run with a (fake, tiny) bundle directory as artifact; returns (run_id, source uri of the bundle)."""
    run = client.create_run(experiment_id, run_name=label)
    bundle = tmp_path / label / "bundle"
    bundle.mkdir(parents=True)
    (bundle / "manifest.json").write_text(json.dumps({"label": label}))
    client.log_artifacts(run.info.run_id, str(bundle), "bundle")
    client.set_terminated(run.info.run_id)
    return run.info.run_id, f"{run.info.artifact_uri}/bundle"


def _register(client, name, experiment_id, tmp_path, label, pair_outcomes):
    run_id, source = _train_run(client, experiment_id, tmp_path, label)
    accuracy = sum(o.correct for o in pair_outcomes.values()) / len(pair_outcomes)
    return register_version(client, name, source, run_id, metrics={"eval_accuracy": accuracy},
                            tags={"label": label}, pair_outcomes=pair_outcomes)


def _promotion_flow(client, experiment_id: str, tmp_path: Path) -> None:
    """The whole life of a champion; shared by the SQLite and the PostgreSQL + S3 back ends."""
    name = f"dmoerm-{uuid.uuid4().hex[:8]}"
    assert get_alias(client, name) is None  # no registered model yet

    # v1, the first model: compared with a baseline's outcomes on the same pairs.
    v1_outcomes = outcomes({"chat": 75, "code": 75, "math": 75})
    v1 = _register(client, name, experiment_id, tmp_path, "v1", v1_outcomes)
    assert v1.version == "1"
    assert v1.tags["dmoerm.metric.eval_accuracy"] == "0.75" and v1.tags["label"] == "v1"
    d1 = decide_against_champion(client, name, v1.version, CFG, baseline=BASELINE)
    assert d1.promote, d1.reason
    assert promote(client, name, v1.version, d1)
    assert get_alias(client, name).version == "1"

    # v2, deliberately worse than v1: refused, the alias stays, the refusal is on the version.
    worse = outcomes({"chat": 65, "code": 70, "math": 70})
    v2 = _register(client, name, experiment_id, tmp_path, "v2", worse)
    d2 = decide_against_champion(client, name, v2.version, CFG)
    assert not d2.promote
    assert not promote(client, name, v2.version, d2)
    assert get_alias(client, name).version == "1"
    tags = client.get_model_version(name, v2.version).tags
    assert tags["dmoerm.promotion.decision"] == "refused"
    assert tags["dmoerm.promotion.reason"] == d2.reason and "not above 0" in d2.reason
    assert tags["dmoerm.promotion.previous_holder"] == "1"
    assert float(tags["dmoerm.promotion.ci_high"]) == d2.ci_high < 0
    assert json.loads(tags["dmoerm.promotion.per_category"])["chat"]["delta"] == pytest.approx(-0.10)

    # v3, better than v1 on the pairs v1 is stored with: promoted.
    better = outcomes({"chat": 90, "code": 85, "math": 80})
    v3 = _register(client, name, experiment_id, tmp_path, "v3", better)
    assert load_pair_outcomes(client, name, "1") == v1_outcomes
    d3 = decide_against_champion(client, name, v3.version, CFG)
    assert d3 == decide(better, v1_outcomes, CFG)  # the same comparison, from the stored outcomes
    assert promote(client, name, v3.version, d3)
    assert get_alias(client, name).version == "3"
    assert client.get_model_version(name, "3").tags["dmoerm.promotion.decision"] == "promoted"
    assert get_history(client, name) == ["1", "3"]
    assert client.get_model_version_by_alias(name, "champion").version == "3"  # plain MLflow sees it too

    # Roll back: v1 is champion again, both sides of the rollback are recorded.
    restored = rollback(client, name)
    assert restored.version == "1"
    assert get_alias(client, name).version == "1"
    assert get_history(client, name) == ["1"]
    assert client.get_model_version(name, "3").tags["dmoerm.rollback.demoted"] == "true"
    assert client.get_model_version(name, "1").tags["dmoerm.rollback.restored_from"] == "3"
    with pytest.raises(ValueError, match="no previous 'champion' to roll back to"):
        rollback(client, name)

    # The registered bundle is reachable from the champion's source.
    champion = get_alias(client, name)
    assert champion.source.endswith("/bundle")
    path = client.download_artifacts(champion.run_id, "bundle", str(tmp_path / "download"))
    assert json.loads((Path(path) / "manifest.json").read_text()) == {"label": "v1"}


def test_promotion_flow_on_sqlite_server(mlflow_server, tmp_path: Path) -> None:
    client = _client(mlflow_server.tracking_uri)
    experiment_id = client.create_experiment(f"registry-{uuid.uuid4().hex[:8]}")
    _promotion_flow(client, experiment_id, tmp_path)


def test_promotion_flow_on_postgres_and_s3_server(mlflow_server_pg, s3_server, tmp_path: Path) -> None:
    client = _client(mlflow_server_pg.tracking_uri)
    experiment_id = client.create_experiment(f"registry-{uuid.uuid4().hex[:8]}")
    _promotion_flow(client, experiment_id, tmp_path)
    # The artifacts really went to the S3 bucket behind the server.
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket="mlflow-artifacts")["Contents"]]
    assert any(k.endswith(PAIR_OUTCOMES_ARTIFACT) for k in keys)
    assert any(k.endswith("bundle/manifest.json") for k in keys)


def test_refused_first_model_sets_no_alias(mlflow_server, tmp_path: Path) -> None:
    client = _client(mlflow_server.tracking_uri)
    experiment_id = client.create_experiment(f"registry-{uuid.uuid4().hex[:8]}")
    name = f"dmoerm-{uuid.uuid4().hex[:8]}"
    v1 = _register(client, name, experiment_id, tmp_path, "v1", BASELINE)
    with pytest.raises(ValueError, match="no 'champion' yet: pass baseline="):
        decide_against_champion(client, name, v1.version, CFG)
    decision = decide_against_champion(client, name, v1.version, CFG, baseline=BASELINE)
    assert not promote(client, name, v1.version, decision)
    assert get_alias(client, name) is None and get_history(client, name) == []
    assert client.get_model_version(name, "1").tags["dmoerm.promotion.previous_holder"] == "none"
    with pytest.raises(ValueError, match="has no 'champion' alias"):
        rollback(client, name)


def test_load_pair_outcomes_without_artifact_says_what_to_do(mlflow_server, tmp_path: Path) -> None:
    client = _client(mlflow_server.tracking_uri)
    experiment_id = client.create_experiment(f"registry-{uuid.uuid4().hex[:8]}")
    name = f"dmoerm-{uuid.uuid4().hex[:8]}"
    run_id, source = _train_run(client, experiment_id, tmp_path, "bare")
    register_version(client, name, source, run_id, metrics={}, tags={})
    assert register_version(client, name, source, run_id).version == "2"  # the model exists: reused
    with pytest.raises(ValueError, match="log the evaluation with log_pair_outcomes"):
        load_pair_outcomes(client, name, 1)
