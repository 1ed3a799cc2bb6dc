"""A fair comparison: the single RM learns from every human-ranked sample DMoERM learns from and gets the
same tuning budget; the report states both. Promotion against a holder evaluated on other pairs re-scores
the holder instead of crashing after registration, and a re-run never registers a second version."""

from __future__ import annotations

from pathlib import Path

import pytest
from pipeline_fixtures import REPO, write_config, write_task

from dmoerm.config import load_config
from dmoerm.pipeline import open_store, train_locally
from dmoerm.stages.budget import baseline_train_samples, data_budgets, sample_key
from dmoerm.stages.data import data_step, splits_of
from dmoerm.stages.labels import label_step
from dmoerm.stages.route import route_step

pytestmark = [pytest.mark.slow, pytest.mark.integration]
TRIALS = 2


def _config(folder, tiny_bert_dir, *overrides: str):
    data = write_task(folder, n=150)
    path = write_config(folder, tiny_bert_dir, data, str(folder / "storage"), None)
    # 60 of each category's 150 samples are split; the label sources (the same files) also hold the other
    # 90, minus nothing: they are in no split, so they reach the experts and must reach the baseline too.
    return load_config(path, ["data.max_samples_per_category=60", f"platform.tune.num_samples={TRIALS}",
                              "platform.tune.max_epochs=3", "platform.tune.grace_period=1",
                              f"output_dir={folder / 'out'}", *overrides])


@pytest.fixture(scope="module")
def first(tmp_path_factory, tiny_bert_dir):
    folder = tmp_path_factory.mktemp("fair")
    cfg = _config(folder, tiny_bert_dir)
    return cfg, train_locally(cfg)


def test_the_baseline_learns_from_every_sample_dmoerm_learns_from(first):
    cfg, run = first
    store = open_store(cfg)
    budgets = run.report["budgets"]
    d = budgets["dmoerm"]
    outside = d["parts"]["label_sources_outside_phase1_phase3"]["samples"]
    assert outside > 0  # the experts learn from label-source samples in no split
    assert d["samples"] == d["parts"]["phase1"]["samples"] + d["parts"]["phase3"]["samples"] + outside
    assert budgets["baseline"] == {"samples": d["samples"], "pairs": d["pairs"]}
    baseline_info = next(store.done("baseline", k) for k in _keys(store, "baseline"))
    assert baseline_info["train_samples"] == d["samples"]
    held_out = {s.prompt_key for s in run_test_and_val(store, cfg)}
    route = _only(store, "route")
    labels = _only(store, "labels")
    base = baseline_train_samples(store, route, labels)
    assert not held_out & {s.prompt_key for s in base}
    assert len({sample_key(s) for s in base}) == len(base)
    assert "single RM " + f"{d['samples']}/{d['pairs']}" in run.report["table"]


def test_both_models_get_the_same_tuning_budget(first):
    cfg, run = first
    store = open_store(cfg)
    assert run.ran["search/baseline"] and run.ran["search/alpha"] and run.ran["search/beta"]
    trials = sorted(store.done("search", k)["trials"] for k in _keys(store, "search"))
    assert trials == [TRIALS] * 3
    assert f"tuning: {TRIALS} optuna trials for each category's aggregator and the single RM" in run.report["table"]


def test_the_demo_config_gives_both_models_one_budget(tmp_path):
    """The demo's data, route and labels stages (MiniLM from its wheel, the hh-rlhf subset)."""
    cfg = load_config(REPO / "configs" / "demo.yaml", [f"platform.storage_uri={tmp_path}", "router.train.epochs=1"])
    store = open_store(cfg, run_id="budget")
    route = route_step(cfg, store, data_step(cfg, store))
    labels = label_step(cfg, store, route)
    b = data_budgets(store, route, labels, baseline=True)
    parts = b["dmoerm"]["parts"]
    assert parts["phase1"]["samples"] + parts["phase3"]["samples"] == 2 * 600 * 0.7 == 840
    assert parts["label_sources_outside_phase1_phase3"]["samples"] > 0
    assert b["baseline"] == {k: b["dmoerm"][k] for k in ("samples", "pairs")}
    assert b["test"]["samples"] == 240


def test_promotion_against_a_holder_evaluated_on_other_pairs(first, tmp_path_factory, tiny_bert_dir,
                                                             mlflow_server):
    from mlflow import MlflowClient

    from dmoerm import registry
    from dmoerm.bundle import load_bundle
    from dmoerm.evaluation import evaluate
    from dmoerm.mlflow_model import log_bundle_model
    from dmoerm.promotion import decide

    cfg_a, run_a = first
    cfg_b = _config(tmp_path_factory.mktemp("fair-b"), tiny_bert_dir, "data.splits.seed=1",
                    "platform.tune.enabled=false")
    run_b = train_locally(cfg_b)
    client, uri, name = MlflowClient(mlflow_server.tracking_uri), mlflow_server.tracking_uri, "fair-dmoerm"
    exp = client.create_experiment("fairness")

    store_a = open_store(cfg_a)
    run_id = client.create_run(exp).info.run_id
    version_a, _ = registry.register_evaluation(client, uri, run_id, name, cfg_a.platform, store_a, run_a.evaluation)
    client.set_registered_model_alias(name, "champion", version_a)  # the holder, whatever its own decision

    # Run B stopped right after registering (what a killed job leaves): a version without a decision.
    import mlflow

    store_b = open_store(cfg_b)
    run_id_b = client.create_run(exp).info.run_id
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id_b):
        info = log_bundle_model(store_b.path("evaluate", run_b.evaluation, "bundle"))
    outcomes_b = {k: registry.PairOutcome(*v)
                  for k, v in store_b.get_json("evaluate", run_b.evaluation, "pair_outcomes.json").items()}
    registry.register_version(client, name, info.model_uri, run_id_b, model_id=info.model_id,
                              tags={"dmoerm.evaluation_key": run_b.evaluation}, pair_outcomes=outcomes_b)
    assert set(outcomes_b) != set(registry.load_pair_outcomes(client, name, version_a))  # other splits

    version_b, decision = registry.register_evaluation(client, uri, run_id_b, name, cfg_b.platform, store_b,
                                                       run_b.evaluation)
    assert version_b == "2" and len(client.search_model_versions(f"name='{name}'")) == 2
    tags = client.get_model_version(name, version_b).tags
    assert tags["dmoerm.promotion.decision"] in {"promoted", "refused"}
    assert "could not compare" not in decision["reason"]
    # The holder was scored on B's test samples, the way B was: the recorded delta is that comparison.
    test_b = store_b.get_samples("evaluate", run_b.evaluation, "test.jsonl")
    holder = evaluate(load_bundle(store_a.path("evaluate", run_a.evaluation, "bundle")).model, test_b).outcomes
    expected = decide(outcomes_b, holder, cfg_b.platform.promotion)
    assert float(tags["dmoerm.promotion.delta"]) == pytest.approx(expected.delta)

    again, again_decision = registry.register_evaluation(client, uri, run_id_b, name, cfg_b.platform, store_b,
                                                         run_b.evaluation)
    assert again == "2" and again_decision["skipped"]
    assert len(client.search_model_versions(f"name='{name}'")) == 2


def _keys(store, stage: str) -> list[str]:
    folder = Path(store.root) / "stages" / stage
    return sorted(p.name for p in folder.iterdir() if store.done(stage, p.name))


def _only(store, stage: str) -> str:
    keys = _keys(store, stage)
    assert len(keys) == 1, keys
    return keys[0]


def run_test_and_val(store, cfg) -> list:
    splits = splits_of(store, "route", _only(store, "route"))
    return splits["test"] + splits["val"]


def test_a_first_model_without_a_baseline_is_refused_with_a_reason(tmp_path_factory, tiny_bert_dir, mlflow_server):
    from mlflow import MlflowClient

    from dmoerm import registry

    cfg = _config(tmp_path_factory.mktemp("no-baseline"), tiny_bert_dir, "baseline=false",
                  "platform.tune.enabled=false")
    run = train_locally(cfg)
    client = MlflowClient(mlflow_server.tracking_uri)
    run_id = client.create_run(client.create_experiment("no-baseline")).info.run_id
    version, decision = registry.register_evaluation(client, mlflow_server.tracking_uri, run_id, "no-baseline",
                                                     cfg.platform, open_store(cfg), run.evaluation)
    assert version == "1" and not decision["promote"]
    assert "no single-RM baseline" in decision["reason"]
    assert client.get_model_version("no-baseline", "1").tags["dmoerm.promotion.decision"] == "refused"
