"""Rank semantics end to end: hh and canonical 3-response data (ranks [2, 1, 3], rank 1 = best) through
loaders -> router -> phases 1-3 (with the in-process aggregator search) -> bundle -> scoring -> evaluation,
on a tiny model, as ``dmoerm train`` runs it. If any stage inverted the rank direction, the trained model
would prefer the worse responses and these accuracies would collapse."""

from __future__ import annotations

import pytest
from tiny import hh_records, ranked_records, write_jsonl

from dmoerm.bundle import load_bundle
from dmoerm.config import load_config
from dmoerm.data.splits import split_samples
from dmoerm.pipeline import train_locally
from dmoerm.stages.data import load_data

N = 120
FAST = {"lr": 3e-3, "epochs": 2, "batch_size": 16, "patience": 2, "warmup_ratio": 0.0}


@pytest.mark.slow
def test_trained_model_gives_the_rank_one_response_the_highest_reward(tmp_path, tiny_bert_dir):
    hh = write_jsonl(tmp_path / "hh.jsonl", hh_records(N))
    ranked = write_jsonl(tmp_path / "ranked.jsonl", ranked_records(N, offset=1000))
    cfg = load_config(data={
        "name": "rank-semantics",
        "output_dir": str(tmp_path / "run"),
        "platform": {"storage_uri": str(tmp_path / "storage"), "tune": {"num_samples": 4, "max_epochs": 6}},
        "taxonomy": [{"name": "greeting", "capabilities": ["politeness"]},
                     {"name": "advice", "capabilities": ["politeness", "ranking"]}],
        "data": {"sources": [{"path": hh, "format": "hh", "category": "greeting"},
                             {"path": ranked, "format": "dmoerm", "category": "advice"}],
                 "splits": {"phase1": 0.6, "phase3": 0.2, "val": 0.1, "test": 0.1}},
        "labels": {"source": "dataset",
                   "datasets": {"politeness": [{"path": hh, "format": "hh"}],
                                "ranking": [{"path": ranked, "format": "dmoerm"}]}},
        "model": {"base": tiny_bert_dir, "top_layers": 1, "max_length": 48, "feature_batch_size": 64,
                  "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
        "router": {"train": {"lr": 1e-2, "epochs": 10, "batch_size": 32, "patience": 3}},
        "phase1": FAST, "phase2": {**FAST, "epochs": 1},
        "phase3": {"lr": 1e-2, "epochs": 6, "batch_size": 16, "patience": 3},
        "baseline": False,
    })
    result = train_locally(cfg)
    bundle = load_bundle(result.bundle_uri)

    test = split_samples(load_data(cfg)[0], cfg.data.splits)["test"]  # every source gives its category
    ranked_test = [s for s in test if s.category == "advice"]
    assert len(ranked_test) >= 8 and all(s.ranks == [2, 1, 3] for s in ranked_test)
    scored = bundle.model.score_samples(ranked_test)
    best_is_top = [max(range(3), key=lambda i: row[i].reward) == s.ranks.index(1)
                   for s, row in zip(ranked_test, scored)]
    assert sum(best_is_top) / len(best_is_top) >= 0.8, best_is_top
    # the rude response (rank 3) is scored below the polite one (rank 1) on every held-out sample
    assert all(row[1].reward > row[2].reward for row in scored)

    report = result.report
    assert report["dmoerm"]["overall"]["pairs"] == sum(len(s.pairs()) for s in test)
    assert report["dmoerm"]["overall"]["accuracy"] >= 0.8
    assert report["dmoerm"]["greeting"]["accuracy"] >= 0.8
    assert report["metrics"]["router/accuracy"] >= 0.8  # the two categories' prompts differ: routing is learnable
    assert bundle.meta["metrics"]["dmoerm/acc/overall"] == report["dmoerm"]["overall"]["accuracy"]
    assert {"advice/expert/ranking/val_accuracy", "greeting/phase3/val_accuracy"} <= set(bundle.meta["metrics"])
    assert (tmp_path / "run" / "bundle" / "bundle.json").exists() and result.bundle_uri.endswith("bundle")
    assert all(result.ran.values()) and "search/advice" in result.ran  # the in-process aggregator search ran

    again = train_locally(cfg)  # every stage is finished: nothing runs, the same evaluation comes back
    assert again.evaluation == result.evaluation and not any(again.ran.values()), again.ran
