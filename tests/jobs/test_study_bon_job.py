"""The best-of-N study end to end: a MiniLM bundle, 24 alpaca-bon prompts x 8 candidates, scored as Ray tasks
on a local Ray instance, reported to a real ``mlflow server``; the logged numbers equal the in-process
arithmetic on the bundle's own scores, and a re-run through ``dmoerm study bon`` reuses the finished scoring."""

from __future__ import annotations

import csv
import io
import json
import sys

import pytest
import yaml
from pipeline_fixtures import REPO

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.integration]
PROMPTS, SAMPLES = 24, list(range(8))
SCORERS = [("DMoERM", "dmoerm", {}), ("single RM", "baseline", {}),
           ("DMoERM penalised", "dmoerm-uncertainty", {"weight": 1.0}), ("ensemble mean", "ensemble-mean", {}),
           ("ensemble min", "ensemble-min", {}), ("ensemble uncertainty", "ensemble-uncertainty", {})]


@pytest.fixture(scope="module")
def minilm_bundle(tmp_path_factory):
    """A DMoERM on the MiniLM base (random router, perturbed experts, expert statistics for the penalised
    reward) with a perturbed single-RM top, and a 3-member RM ensemble in ``<bundle>/ensemble``."""
    from tiny import TINY_LORA, build_reward_model, pairwise_samples, perturb_

    from dmoerm.bundle import save_bundle
    from dmoerm.ensemble import save_ensemble
    from dmoerm.modeling.aggregator import AggregatorConfig
    from dmoerm.modeling.backbone import load_backbone
    from dmoerm.modeling.top import TopStack
    from dmoerm.uncertainty import capability_stats, stats_to_meta

    backbone = load_backbone("minilm", top_layers=1, pooling="mean", max_length=64)
    model = build_reward_model(backbone, {"chat": ["empathy", "logic"], "qa": ["correctness", "logic"]}, seed=5)
    stats = capability_stats(model, pairwise_samples(6, "chat") + pairwise_samples(6, "qa", offset=6))
    baseline = TopStack(backbone)
    perturb_(baseline, ["head"], scale=0.5, seed=9)
    path = tmp_path_factory.mktemp("bon") / "bundle"
    save_bundle(path, model, lora=TINY_LORA, aggregator=AggregatorConfig(), router_width=0, baseline=baseline,
                extra={"capability_stats": stats_to_meta(stats)})
    members = [TopStack(backbone) for _ in range(3)]
    for i, m in enumerate(members):
        perturb_(m, ["head", "layer"], scale=0.3, seed=20 + i)
    save_ensemble(path / "ensemble", members, {"seeds": [20, 21, 22], "uncertainty_weight": 0.5}, backbone)
    return str(path)


def _artifact_text(client, run_id: str, path: str) -> str:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return open(client.download_artifacts(run_id, path, tmp), encoding="utf-8").read()


def test_bon_study_end_to_end_and_rerun_reuses_scoring(local_ray, minilm_bundle, shared_data, mlflow_server,
                                                       tmp_path, capsys, torch_single_thread):
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from mlflow import MlflowClient

    from dmoerm import cli
    from dmoerm.bundle import load_bundle
    from dmoerm.ensemble import load_ensemble
    from dmoerm.studies.bon import bon_curves, load_alpaca_bon
    from dmoerm.uncertainty import penalised_rewards, stats_from_meta
    from jobs.study_bon import main

    storage = tmp_path / "storage"
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump({
        "bundle": minilm_bundle, "tracking_uri": mlflow_server.tracking_uri, "experiment": "bon-test",
        "storage_uri": str(storage), "candidates": {"alpaca_bon": {"path": str(shared_data / "alpaca-bon"),
                                                                    "max_prompts": PROMPTS, "samples": SAMPLES}},
        "scorers": [{"name": n, "kind": k, **extra} for n, k, extra in SCORERS],
        "ns": [1, 2, 4, 8], "num_bootstrap": 300, "seed": 4, "batch_size": 16}))
    assert main(["--config", str(config)]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    assert all(v.startswith("scored ") for v in summary["trials"].values()) and len(summary["trials"]) == 6
    table = [line.split() for line in out.splitlines()]
    for name, _, _ in [*SCORERS, ("gold oracle", "", {})]:  # a row per N: "<name> N KL gold [lo, hi] ..."
        words = len(name.split())
        assert [r[words] for r in table if r[:words] == name.split() and r[words:words + 1] != ["penalised"]
                and len(r) > words] == ["1", "2", "4", "8"], name

    client = MlflowClient(mlflow_server.tracking_uri)
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["candidates.alpaca_bon.max_prompts"] == str(PROMPTS)
    names = {a.path for a in client.list_artifacts(run.info.run_id)} | {
        a.path for d in ("plots", "results") for a in client.list_artifacts(run.info.run_id, d)}
    assert {"table.txt", "plots/bon_reward_vs_kl.png", "results/bon_points.csv", "results/bon_points.json"} <= names
    assert _artifact_text(client, run.info.run_id, "table.txt").startswith("best-of-N on alpaca-bon")

    # The numbers: the in-process arithmetic on the bundle's own batched scores of the same candidates.
    cands = load_alpaca_bon(shared_data / "alpaca-bon", PROMPTS, SAMPLES)
    loaded = load_bundle(minilm_bundle, batch_size=16)
    samples = cands.samples()
    ensemble = load_ensemble(f"{minilm_bundle}/ensemble", backbone=loaded.model.backbone)
    scores = loaded.model.score_samples(samples)
    rewards = {"DMoERM": [[s.reward for s in row] for row in scores],
               "single RM": loaded.baseline.score_samples(samples),
               "DMoERM penalised": penalised_rewards(scores, stats_from_meta(loaded.meta), 1.0),
               **{f"ensemble {how}": ensemble.score_samples(samples, how) for how in ("mean", "min", "uncertainty")}}
    assert rewards["DMoERM penalised"] != rewards["DMoERM"] and rewards["ensemble min"] != rewards["ensemble mean"]
    expected = {(p.model, p.n): p for p in bon_curves(rewards, cands.gold, [1, 2, 4, 8], num_bootstrap=300, seed=4)}
    logged = list(csv.DictReader(io.StringIO(_artifact_text(client, run.info.run_id, "results/bon_points.csv"))))
    assert len(logged) == 28  # 7 curves (6 models + the gold oracle) x 4 N
    for row in logged:
        want = expected[(row["model"], int(row["n"]))]
        for key in ("kl", "gold", "gold_low", "gold_high"):
            assert float(row[key]) == pytest.approx(getattr(want, key), abs=1e-6), (row["model"], row["n"], key)
    assert run.data.metrics["gold.DMoERM.n8"] == pytest.approx(expected[("DMoERM", 8)].gold)
    n1 = {m: expected[(m, 1)].gold for m in (*rewards, "gold oracle")}
    assert len({round(v, 9) for v in n1.values()}) == 1, "N=1 is a random candidate for every model"

    # Re-run through the CLI with the same inputs: both models' scoring is reused, the numbers equal.
    done = sorted(p.parent.name for p in storage.rglob("DONE.json"))
    assert cli.main(["study", "bon", "--config", str(config)]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert all(v.startswith("reused ") for v in again["trials"].values()), again["trials"]
    assert sorted(p.parent.name for p in storage.rglob("DONE.json")) == done
    rerun = list(csv.DictReader(io.StringIO(_artifact_text(client, again["run_id"], "results/bon_points.csv"))))
    assert rerun == logged


def test_bon_study_on_generated_candidates_with_a_gold_bundle(local_ray, minilm_bundle, tmp_path, capsys,
                                                              torch_single_thread, mlflow_server):
    """Candidates from a policy model (transformers on CPU, Ray actors), gold from a bundle. With the study's
    own DMoERM as the gold scorer, its best-of-N curve is the gold oracle's."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from tiny_causal import save_tiny_causal

    from jobs.study_bon import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"tell me about topic {i}"}) + "\n"
                               for i in range(5)))
    config = tmp_path / "generated.yaml"
    config.write_text(yaml.safe_dump({
        "bundle": minilm_bundle, "tracking_uri": mlflow_server.tracking_uri, "experiment": "bon-test-generated",
        "storage_uri": str(tmp_path / "storage"), "scorers": [{"name": "DMoERM", "kind": "dmoerm"}],
        "candidates": {"source": "generate", "generate": {
            "prompts": str(prompts), "gold_bundle": minilm_bundle, "num_workers": 1,
            "generation": {"model": save_tiny_causal(tmp_path / "policy"), "num_candidates": 4,
                           "max_new_tokens": 6, "seed": 1, "backend": "transformers"}}},
        "ns": [1, 2, 4], "num_bootstrap": 100}))
    assert main(["--config", str(config)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(summary["trials"]) == {"candidates", "DMoERM", "gold"}
    assert summary["trials"]["candidates"].startswith("generated")
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server.tracking_uri)
    rows = list(csv.DictReader(io.StringIO(_artifact_text(client, summary["run_id"], "results/bon_points.csv"))))
    by = {(r["model"], int(r["n"])): float(r["gold"]) for r in rows}
    for n in (1, 2, 4):
        assert by[("DMoERM", n)] == pytest.approx(by[("gold oracle", n)]), n
    assert by[("DMoERM", 4)] > by[("DMoERM", 1)]
    assert main(["--config", str(config)]) == 0  # generation and both scorings reused
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert all(v.startswith("reused") for v in again["trials"].values())
