"""Category and capability names (dmoerm.names): any printable text is accepted when the config loads, anything
else is refused there naming the field; every file, folder and adapter name is the name's one escaped form."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
from tiny import TINY_LORA, build_reward_model, user
from torch import nn

from dmoerm.bundle import load_bundle, read_meta, save_bundle
from dmoerm.config import load_config
from dmoerm.modeling.aggregator import AggregatorConfig
from dmoerm.names import check_name, metric_name, safe_name

PAPER = ["objective QA", "text creation", "role-playing", "chit-chat"]
AWKWARD = ["logic.v2", "model", "weight", "lora", "lora_A", "modules_to_save", "value_head", "train", "keys", "a",
           "../escape", "..", ".", "a/b", "C:\\x", "Q&A", "日本語", "émotion", "x" * 100, "objective_QA"]
SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def _minimal(taxonomy: list[dict], datasets: dict | None = None, **changes) -> dict:
    caps = {c for cat in taxonomy for c in cat["capabilities"]}
    raw = {"taxonomy": taxonomy, "data": {"sources": [{"path": "a.jsonl", "format": "hh"}]},
           "labels": {"source": "dataset",
                      "datasets": datasets if datasets is not None else {c: [{"path": "l.jsonl", "format": "hh"}]
                                                                          for c in caps}}}
    raw.update(changes)
    return raw


def test_the_papers_names_and_awkward_printable_names_load():
    taxonomy = [{"name": "objective QA", "capabilities": ["logic.v2", "model", "train"]},
                {"name": "text creation", "capabilities": ["fluency", "../escape"]},
                {"name": "../escape", "capabilities": ["weight", "日本語"]}]
    cfg = load_config(data=_minimal(taxonomy))
    assert cfg.capabilities == {t["name"]: t["capabilities"] for t in taxonomy}
    assert cfg.category("objective QA").capabilities == ["logic.v2", "model", "train"]


@pytest.mark.parametrize(("taxonomy", "message"), [
    ([{"name": "chat", "capabilities": ["x"]}, {"name": "", "capabilities": ["y"]}],
     r"taxonomy\[1\]: name: a category name must not be empty"),
    ([{"name": "chat", "capabilities": ["x"]}, {"name": "qa", "capabilities": ["logic\x00"]}],
     r"taxonomy\[1\]: capabilities\[0\]: capability name 'logic\\x00' contains control .*U\+0000"),
    ([{"name": "chat", "capabilities": ["x", "zero\u200bwidth"]}],
     r"taxonomy\[0\]: capabilities\[1\]: .*U\+200B"),
    ([{"name": "objective QA ", "capabilities": ["x"]}], r"taxonomy\[0\]: name: .*leading or trailing whitespace"),
    ([{"name": "line\nbreak", "capabilities": ["x"]}], r"taxonomy\[0\]: name: .*U\+000A"),
    ([{"name": "chat", "capabilities": ["x" * 101]}], r"taxonomy\[0\]: capabilities\[0\]: .*101 characters long"),
    ([{"name": "chat", "capabilities": ["x", "x"]}], r"taxonomy\[0\]: capabilities: duplicate capability 'x'"),
    ([{"name": "Helpful", "capabilities": ["x"]}, {"name": "helpful", "capabilities": ["y"]}],
     r"taxonomy: category names 'Helpful' and 'helpful' would share the file and adapter name"),
    ([{"name": "qa", "capabilities": ["objective QA", safe_name("objective QA")]}],
     r"taxonomy\[0\]: capabilities: capability names 'objective QA' and 'objective_QA-[0-9a-f]{8}' would share"),
])
def test_bad_names_are_refused_when_the_config_loads_naming_the_field(taxonomy, message):
    with pytest.raises(ValueError, match=message):
        load_config(data=_minimal(taxonomy))


def test_names_elsewhere_in_the_config_must_be_the_taxonomys():
    taxonomy = [{"name": "objective QA", "capabilities": ["logic"]}]
    typo = {"logic": [{"path": "l.jsonl", "format": "hh"}], "objective qa": [{"path": "l.jsonl", "format": "hh"}]}
    with pytest.raises(ValueError, match=r"labels\.datasets\.objective qa: no category of the taxonomy lists"):
        load_config(data=_minimal(taxonomy, typo))
    sources = {"sources": [{"path": "a.jsonl", "format": "autoj_pairwise", "category_map": {"qa": "objective qa"}}]}
    with pytest.raises(ValueError, match=r"data\.sources\[0\]\.category_map maps to \['objective qa'\], not in"):
        load_config(data=_minimal(taxonomy, data=sources))


def test_check_name_accepts_printable_text_only():
    for name in PAPER + AWKWARD:
        assert check_name("f", name) == name
    for bad in ("", " x", "x\t", "a\x7fb", "a\u2028b", "\ufeffbom"):
        with pytest.raises(ValueError, match="^f: "):
            check_name("f", bad)
    with pytest.raises(ValueError, match="must be a string"):
        check_name("f", 3)


def test_safe_names_are_one_path_component_and_a_valid_adapter_key():
    names = PAPER + AWKWARD
    safe = [safe_name(n) for n in names]
    assert len(set(safe)) == len(names)  # distinct names, distinct safe names
    for name, s in zip(names, safe):
        assert SAFE.fullmatch(s) and s not in (".", "..") and len(s) <= 100, (name, s)
        assert safe_name(name) == s  # deterministic
        nn.ModuleDict({s: nn.Linear(1, 1)})  # torch accepts it as a module key (peft keeps adapters in these)
        nn.ParameterDict({s: nn.Parameter()})
    for plain in ("helpful", "alpha_taste", "empathy", "chit-chat", "role-playing", "v2", "model", "weight"):
        assert safe_name(plain) == plain  # existing bundles keep their folders and adapter names
    digest = hashlib.sha256(b"objective QA").hexdigest()[:8]
    assert safe_name("objective QA") == f"objective_QA-{digest}"  # pinned: bundles depend on it
    assert safe_name("logic.v2").startswith("logic_v2-") and safe_name("../escape").startswith("escape-")


def test_metric_names_keep_what_mlflow_accepts_and_escape_the_rest():
    from mlflow.utils.validation import _validate_metric_name

    assert metric_name("objective QA") == "objective QA" and metric_name("logic.v2") == "logic.v2"
    for name in PAPER + AWKWARD:
        _validate_metric_name(f"dmoerm/acc/{metric_name(name)}")
        _validate_metric_name(f"dmoerm.acc.{metric_name(name)}")


def test_label_files_stay_in_their_stage_folder():
    from dmoerm.stages.labels import label_file

    for cat in ("../escape", "objective QA", "a/b"):
        for cap in ("../escape", "logic.v2", "model"):
            name = label_file(cat, cap, "train")
            assert Path(name).name == name and name.count(".") == 3 and name.endswith(".train.jsonl"), name
    assert label_file("alpha", "alpha_taste", "val") == "alpha.alpha_taste.val.jsonl"  # unchanged for plain names


def test_a_bundle_with_escaping_names_writes_only_inside_its_folder_and_loads_by_name(tiny_bundle, tmp_path):
    taxonomy = {"../escape": ["model", "logic.v2"], "objective QA": ["../escape", "train"]}
    model = build_reward_model(tiny_bundle[1].backbone, taxonomy)
    target = tmp_path / "store" / "bundle"
    save_bundle(target, model, lora=TINY_LORA, aggregator=AggregatorConfig(), router_width=0)
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert all(p.parts[:2] == ("store", "bundle") for p in written), written
    folders = {p.name for p in (target / "categories").iterdir()}
    assert folders == {safe_name(n) for n in taxonomy}
    assert [(c["name"], c["dir"]) for c in read_meta(target)["taxonomy"]] == [(n, safe_name(n)) for n in taxonomy]

    loaded = load_bundle(target)
    assert list(loaded.model.categories) == list(taxonomy)
    ctx, resp = [user("what is 2 + 2?")] * 2, ["4", "five"]
    for cat, caps in taxonomy.items():
        got = loaded.model.score(ctx, resp, [cat, cat])
        want = model.score(ctx, resp, [cat, cat])
        assert [s.category for s in got] == [cat, cat] and list(got[0].capability_scores) == caps
        assert [s.reward for s in got] == pytest.approx([s.reward for s in want], abs=1e-5)
    only = load_bundle(target, backbone=loaded.model.backbone, categories=["objective QA"], check_fingerprint=False)
    assert list(only.model.categories) == ["objective QA"]


def test_a_bundle_folder_that_leaves_the_bundle_is_refused(tiny_bundle, tmp_path):
    import json
    import shutil

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle[0], bundle)
    meta = json.loads((bundle / "bundle.json").read_text())
    meta["taxonomy"][0]["dir"] = "../../elsewhere"
    (bundle / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"has folder '\.\./\.\./elsewhere', not one plain folder name"):
        load_bundle(bundle)


def test_names_mlflow_refuses_as_keys_are_escaped_in_params_and_metrics(tmp_path):
    """A config MLflow cannot log (a capability 'Q&A' keys labels.datasets) would fail the Ray job; evaluation
    metrics per category ('dmoerm/acc/C++ (code)') would fail registration after all training."""
    from dmoerm.evaluation import EvalReport
    from dmoerm.tracking import Tracker

    taxonomy = [{"name": "C++ (code)", "capabilities": ["Q&A", "logic.v2"]}, {"name": "objective QA",
                                                                             "capabilities": ["what?"]}]
    cfg = load_config(data=_minimal(taxonomy))
    acc = {"accuracy": 0.5, "pairs": 2}
    report = EvalReport(dmoerm={"C++ (code)": acc, "objective QA": acc, "overall": acc},
                        baseline={"C++ (code)": acc, "objective QA": acc, "overall": acc},
                        router_accuracy=1.0, confusion=[[1, 0], [0, 1]], categories=["C++ (code)", "objective QA"])
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "names", artifact_location=str(tmp_path / "art"))
    tracker.log_params(tracker.run_id, cfg)
    tracker.log_metrics(tracker.run_id, {k.replace("/", "."): v for k, v in report.metrics().items()})
    run = tracker.client.get_run(tracker.run_id)
    assert f"labels.datasets.{safe_name('Q&A')}" in run.data.params and "labels.datasets.logic.v2" in run.data.params
    assert {f"dmoerm.acc.{safe_name('C++ (code)')}", "dmoerm.acc.objective QA", "dmoerm.acc.overall"} <= set(
        run.data.metrics)
