"""The RM-ensemble baselines through the pipeline (``ensemble.members``): members trained like the single RM
with other seeds, evaluated beside DMoERM with paired-bootstrap intervals, saved with the bundle; and the
experts' score statistics of the uncertainty-penalised reward, from training rows only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pipeline_fixtures import write_config, write_task
from safetensors.torch import load_file

from dmoerm.bundle import load_bundle
from dmoerm.config import load_config
from dmoerm.ensemble import load_ensemble
from dmoerm.evaluation import pair_outcomes
from dmoerm.pipeline import open_store, train_locally
from dmoerm.stages.data import splits_of
from dmoerm.uncertainty import capability_stats, stats_from_meta

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _keys(store, stage: str) -> list[str]:
    root = store.local_root / "stages" / stage
    return sorted(p.name for p in root.iterdir() if (p / "DONE.json").exists())


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_bert_dir):
    folder = tmp_path_factory.mktemp("ensemble")
    data = write_task(folder, n=150)
    path = write_config(folder, tiny_bert_dir, data, str(folder / "storage"), None)
    cfg = load_config(path, ["data.max_samples_per_category=60", "platform.tune.enabled=false",
                             "ensemble.members=2", "ensemble.uncertainty_weight=0.5", f"output_dir={folder / 'out'}"])
    return cfg, train_locally(cfg)


def test_the_report_has_every_ensemble_combination_with_its_interval(run):
    cfg, result = run
    ens = result.report["ensembles"]
    assert sorted(ens) == ["ensemble_mean", "ensemble_min", "ensemble_uncertainty"]
    pairs = result.report["dmoerm"]["overall"]["pairs"]
    metrics = open_store(cfg).done("evaluate", result.evaluation)["metrics"]
    for name, r in ens.items():
        i = r["interval"]
        assert i["num_pairs"] == pairs and i["low"] <= i["delta"] <= i["high"]
        assert i["delta"] == pytest.approx(result.report["dmoerm"]["overall"]["accuracy"] - r["accuracy"]["overall"]
                                           ["accuracy"])
        line = f"{name}: overall {r['accuracy']['overall']['accuracy']:.3f}; DMoERM - {name}: "
        assert line in result.report["table"]
        assert metrics[f"delta_{name}/overall"] == i["delta"] and metrics[f"{name}/acc/overall"] == pytest.approx(
            r["accuracy"]["overall"]["accuracy"])
    assert result.ran["ensemble/seed0"] and result.ran["ensemble/seed1"]


def test_members_have_the_baselines_budget_and_differ_by_seed(run):
    cfg, result = run
    store = open_store(cfg)
    members = [store.done("ensemble", k) for k in _keys(store, "ensemble")]
    assert sorted(m["seed"] for m in members) == [0, 1]
    budget = result.report["budgets"]["baseline"]["samples"]
    assert all(m["train_samples"] == budget for m in members)
    baseline = _keys(store, "baseline")
    assert len(baseline) == 2  # the seed-0 member is the single RM itself (same recipe, same key): trained once
    assert {m["baseline_key"] for m in members} == set(baseline)
    tops = [load_file(str(store.path("baseline", m["baseline_key"], "top.safetensors"))) for m in members]
    assert not torch.equal(tops[0]["value_head.weight"], tops[1]["value_head.weight"])


def test_the_bundle_holds_the_ensemble_and_training_row_statistics(run):
    cfg, result = run
    loaded = load_bundle(result.bundle_uri, device="cpu")
    ensemble = load_ensemble(f"{result.bundle_uri}/ensemble", loaded.model.backbone)
    meta = json.loads(Path(result.bundle_uri, "ensemble", "ensemble.json").read_text())
    assert meta["seeds"] == [0, 1] and meta["uncertainty_weight"] == 0.5 and len(ensemble.members) == 2
    store = open_store(cfg)
    route = _keys(store, "route")[0]
    splits = splits_of(store, "route", route)
    rewards = ensemble.score_samples(splits["test"], "mean")  # the saved ensemble reproduces its report row
    outcomes = pair_outcomes(splits["test"], rewards, exclude=result.report["identical_after_truncation"])
    acc = sum(o.correct for o in outcomes.values()) / len(outcomes)
    assert acc == pytest.approx(result.report["ensembles"]["ensemble_mean"]["accuracy"]["overall"]["accuracy"])
    stats = stats_from_meta(loaded.meta)
    assert _close(stats, capability_stats(loaded.model, splits["phase3"]))  # the aggregator's training rows
    assert not _close(stats, capability_stats(loaded.model, splits["test"]))  # not the test rows'


def _close(a: dict, b: dict, tol: float = 1e-5) -> bool:
    return a.keys() == b.keys() and all(
        a[c].keys() == b[c].keys() and all(abs(x - y) <= tol for cap in a[c] for x, y in zip(a[c][cap], b[c][cap]))
        for c in a)
