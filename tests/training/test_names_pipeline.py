"""The paper's category names ("objective QA", "text creation") and capability names that are no plain
adapter or file name (a dot, ``model``, ``train``, ``../escape``) end to end, as ``dmoerm train`` runs them:
config -> label files -> peft adapters -> bundle -> scoring -> serving by category name; every file the run
writes stays in its stage's folder, the run's storage or its output folder."""

from __future__ import annotations

import re

import pytest
from tiny import hh_records, ranked_records, user, write_jsonl

from dmoerm.bundle import load_bundle
from dmoerm.config import load_config
from dmoerm.names import safe_name
from dmoerm.pipeline import train_locally
from dmoerm.serving.api import RewardRequest
from dmoerm.serving.service import Row, ServedModel, ServeLimits, conversations_from_reward
from dmoerm.stages.labels import label_file

N = 80
FAST = {"lr": 3e-3, "epochs": 2, "batch_size": 16, "patience": 2, "warmup_ratio": 0.0}
TAXONOMY = {"objective QA": ["logic.v2", "model"], "text creation": ["train", "../escape"]}


@pytest.mark.slow
def test_the_papers_names_train_load_score_and_serve(tmp_path, tiny_bert_dir):
    data = tmp_path / "data"
    data.mkdir()
    ranked = write_jsonl(data / "ranked.jsonl", ranked_records(N))
    hh = write_jsonl(data / "hh.jsonl", hh_records(N, offset=1000))
    cfg = load_config(data={
        "name": "paper-names",
        "output_dir": str(tmp_path / "run"),
        "platform": {"storage_uri": str(tmp_path / "storage"), "tune": {"enabled": False}},
        "taxonomy": [{"name": n, "capabilities": caps} for n, caps in TAXONOMY.items()],
        "data": {"sources": [{"path": ranked, "format": "dmoerm", "category": "objective QA"},
                             {"path": hh, "format": "hh", "category": "text creation"}],
                 "splits": {"phase1": 0.6, "phase3": 0.2, "val": 0.1, "test": 0.1}},
        "labels": {"source": "dataset",
                   "datasets": {"logic.v2": [{"path": ranked, "format": "dmoerm"}],
                                "model": [{"path": ranked, "format": "dmoerm"}],
                                "train": [{"path": hh, "format": "hh"}],
                                "../escape": [{"path": hh, "format": "hh"}]}},
        "model": {"base": tiny_bert_dir, "top_layers": 1, "max_length": 48, "feature_batch_size": 64,
                  "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
        "router": {"train": {"lr": 1e-2, "epochs": 10, "batch_size": 32, "patience": 3}},
        "phase1": FAST, "phase2": {**FAST, "epochs": 1},
        "phase3": {"lr": 1e-2, "epochs": 4, "batch_size": 16, "patience": 2},
        "baseline": False,
    })
    result = train_locally(cfg)

    # the report and its metrics speak the names as the config spells them
    assert {"objective QA", "text creation", "overall"} <= set(result.report["dmoerm"])
    assert "dmoerm/acc/objective QA" in result.report["metrics"]

    # every file is in the data, storage or output folder; every stage file is inside its <stage>/<key>/
    written = [p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.parts[0] for p in written} <= {"data", "storage", "run"}, sorted({p.parts[0] for p in written})
    stage_files = [p.parts[2:] for p in written if p.parts[:2] == ("storage", "stages")]
    assert stage_files and all(len(p) >= 3 and re.fullmatch(r"[0-9a-f]{16}", p[1]) for p in stage_files)
    labels = sorted(p[2] for p in stage_files if p[0] == "labels" and p[2].endswith(".jsonl"))
    assert labels == sorted(label_file(c, cap, part) for c, caps in TAXONOMY.items() for cap in caps
                            for part in ("train", "val"))

    # the bundle: one folder per category (its safe name), the names themselves in bundle.json
    bundle = load_bundle(result.bundle_uri)
    assert {p.name for p in (tmp_path / "run" / "bundle" / "categories").iterdir()} == {safe_name(n) for n in TAXONOMY}
    assert {c["name"]: c["capabilities"] for c in bundle.meta["taxonomy"]} == TAXONOMY
    contexts = [user("I need your advice about my bike; what would you recommend? (ticket 7)"),
                user("question 3: can you help me with the tax form? (case 21)")]
    for cat, caps in TAXONOMY.items():
        scores = bundle.model.score(contexts, ["thank you, happy to help", "go away"], [cat, cat])
        assert [s.category for s in scores] == [cat, cat] and all(list(s.capability_scores) == caps for s in scores)
    routed = bundle.model.score(contexts, ["thank you, happy to help", "go away"])
    assert {s.category for s in routed} <= set(TAXONOMY)

    # serving: a request names the category as the config does; a replica loads one category by name
    served = ServedModel.load(result.bundle_uri)
    req = RewardRequest.model_validate({"prompt": "what is 2 + 2?", "responses": ["4", "5"],
                                        "category": "objective QA"})
    conv = conversations_from_reward(req, served, ServeLimits())[0]
    scores = served.score_rows(conv.rows())
    assert [s.category for s in scores] == ["objective QA"] * 2
    assert list(scores[0].capability_scores) == ["logic.v2", "model"]
    one = ServedModel.load(result.bundle_uri, resident=1).with_category("text creation")
    assert one.loaded_categories == ["text creation"]
    row = one.score_rows([Row(user("write me a poem"), "roses are red", "text creation")])[0]
    assert row.category == "text creation" and list(row.capability_scores) == ["train", "../escape"]
