"""The ``dmoerm`` command line, in-process on a saved tiny bundle (and once as a real subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import hh_records, pairwise_samples, ranked_records, write_jsonl

from dmoerm.cli import main
from dmoerm.data.loaders import write_samples
from dmoerm.data.records import Turn

pytestmark = pytest.mark.usefixtures("torch_single_thread")

CONVERSATIONS = [
    {"id": "c1", "context": [{"role": "user", "content": "hello, how are you?"}], "responses": ["fine", "go away"]},
    {"context": [{"role": "system", "content": "be kind"}, {"role": "user", "content": "what is 2+2?"}],
     "responses": ["4", "five", "I do not know"]},
    {"id": "c3", "context": [{"role": "user", "content": "tell me a joke"}], "responses": ["knock knock", "no"]},
]


def test_score_writes_one_line_per_input(tiny_bundle, tmp_path):
    path, model, _ = tiny_bundle
    inp = write_jsonl(tmp_path / "in.jsonl", CONVERSATIONS)
    out = tmp_path / "scores.jsonl"
    assert main(["score", "--bundle", path, "--input", inp, "--output", str(out)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["id"] for row in lines] == ["c1", "2", "c3"]  # a missing id falls back to the line number
    for conv, row in zip(CONVERSATIONS, lines):
        ctx = [Turn(t["role"], t["content"]) for t in conv["context"]]
        expected = model.score([ctx] * len(conv["responses"]), conv["responses"])
        assert row["rewards"] == pytest.approx([s.reward for s in expected], abs=1e-5)
        assert row["category"] == expected[0].category and row["category"] in {"chat", "qa"}
        assert 0 < row["category_prob"] <= 1
        assert len(row["capability_scores"]) == len(conv["responses"])
        caps = {"chat": ["empathy", "logic"], "qa": ["correctness"]}[row["category"]]
        assert all(list(c) == caps for c in row["capability_scores"])


def test_score_to_stdout(tiny_bundle, tmp_path, capsys):
    inp = write_jsonl(tmp_path / "in.jsonl", CONVERSATIONS[:1])
    assert main(["score", "--bundle", tiny_bundle[0], "--input", inp]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and json.loads(out[0])["id"] == "c1"


@pytest.mark.parametrize(("line2", "message"), [
    ('{"context": [', "invalid JSON"),
    (json.dumps({"context": [{"role": "user", "content": "hi"}]}), "missing or empty list (field 'responses')"),
    (json.dumps({"context": [{"role": "user", "content": "hi"}], "responses": ["a", 3]}),
     "responses must be strings (field 'responses')"),
    (json.dumps({"context": [{"role": "robot", "content": "hi"}], "responses": ["a"]}), "(field 'context')"),
])
def test_malformed_input_exits_2_naming_file_line_and_field_and_writes_nothing(tiny_bundle, tmp_path, capsys,
                                                                               line2, message):
    inp = tmp_path / "bad.jsonl"
    inp.write_text(json.dumps(CONVERSATIONS[0]) + "\n" + line2 + "\n" + json.dumps(CONVERSATIONS[2]) + "\n")
    out = tmp_path / "scores.jsonl"
    assert main(["score", "--bundle", tiny_bundle[0], "--input", str(inp), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after any model-loading progress output
    assert err.startswith(f"dmoerm score: error: {inp}:2: ") and message in err
    assert not out.exists()


def test_missing_bundle_exits_2(tmp_path, capsys):
    inp = write_jsonl(tmp_path / "in.jsonl", CONVERSATIONS)
    assert main(["score", "--bundle", str(tmp_path), "--input", inp]) == 2
    assert "bundle.json is missing" in capsys.readouterr().err


def test_evaluate_prints_the_table_and_writes_metrics(tiny_bundle, tmp_path, capsys):
    data = tmp_path / "test.jsonl"
    samples = pairwise_samples(4, category="chat")
    write_samples(str(data), samples)
    metrics = tmp_path / "metrics.json"
    assert main(["evaluate", "--bundle", tiny_bundle[0], "--data", str(data), "--output", str(metrics)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["category", "pairs", "DMoERM", "single", "RM", "delta"]
    assert any(line.split()[:2] == ["overall", "4"] for line in table)
    assert sum(line.startswith("router accuracy:") for line in table) == 1
    written = json.loads(metrics.read_text())
    assert written["dmoerm"]["overall"]["pairs"] == 4 and "dmoerm/acc/overall" in written["metrics"]
    assert written["baseline"]["overall"]["pairs"] == 4


def test_evaluate_prints_and_writes_both_models_per_pair_outcomes_and_the_difference_interval(tiny_bundle,
                                                                                              tmp_path, capsys):
    from dmoerm.evaluation import evaluate

    _, model, baseline = tiny_bundle
    samples = pairwise_samples(6, category="chat")
    data = tmp_path / "test.jsonl"
    write_samples(str(data), samples)
    out = tmp_path / "report.json"
    assert main(["evaluate", "--bundle", tiny_bundle[0], "--data", str(data), "--output", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    expected = evaluate(model, samples, baseline)
    assert f"DMoERM - single RM: {expected.interval}" in lines
    assert any(line.startswith("per pair: both right ") for line in lines)
    written = json.loads(out.read_text())
    assert written["interval"]["num_pairs"] == 6 and written["interval"]["low"] == expected.interval.low
    assert written["pairs"] == {k: {"category": "chat", "dmoerm": o.correct,
                                    "baseline": expected.baseline_outcomes[k].correct}
                                for k, o in expected.outcomes.items()}
    assert written["truncation"]["rows"] == 12 and written["identical_after_truncation"] == []


def test_evaluate_reports_the_datas_own_labels_as_subsets_not_router_classes(tiny_bundle, tmp_path, capsys):
    data = tmp_path / "test.jsonl"
    write_samples(str(data), pairwise_samples(2, category="math") + pairwise_samples(2, category="code", offset=2))
    assert main(["evaluate", "--bundle", tiny_bundle[0], "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[0] == "subset" and "router accuracy" not in out and "nan" not in out
    assert any(line.split()[:2] == ["math", "2"] for line in out.splitlines())


@pytest.mark.parametrize(("ranks", "ids", "message"), [
    ([[1, 1]], ["t"], "no preference pair (all ranks tied)"),
    ([[1, 2], [2, 1]], ["same", "same"], "sample id 'same'"),
])
def test_evaluate_checks_the_data_before_loading_the_bundle(tmp_path, capsys, ranks, ids, message):
    from dmoerm.data.records import Sample

    data = tmp_path / "bad.jsonl"
    write_samples(str(data), [Sample(i, [Turn("user", f"hi {n}")], ["a", "b"], r) for n, (i, r) in
                              enumerate(zip(ids, ranks))])
    missing = tmp_path / "no-bundle"  # would fail with "bundle.json is missing" if it were loaded first
    assert main(["evaluate", "--bundle", str(missing), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert message in err and "bundle.json" not in err


@pytest.mark.parametrize(("text", "message"), [
    ('[{"context": [{"role": "user", "content": "hi"}], "responses": ["a"]}]\n',
     "1: expected a JSON object {\"context\": [...], \"responses\": [...]}, got a JSON array (--format "
     "conversations reads JSON Lines"),
    ('[\n  {"context": []}\n]\n', "1: invalid JSON: Expecting value (this looks like a JSON array file"),
    ('"just a string"\n', "1: expected a JSON object"),
    ('{"id": null, "context": [{"role": "user", "content": "hi"}], "responses": ["a"]}\n',
     "1: id must be a string or an integer, got None (field 'id')"),
])
def test_score_input_that_is_not_an_object_per_line_is_named_before_any_model_loads(tmp_path, capsys, text,
                                                                                    message):
    inp = tmp_path / "in.jsonl"
    inp.write_text(text)
    missing = tmp_path / "no-bundle"
    assert main(["score", "--bundle", str(missing), "--input", str(inp)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"dmoerm score: error: {inp}:") and message in err, err


def test_evaluate_on_another_format(tiny_bundle, tmp_path, capsys):
    data = write_jsonl(tmp_path / "ranked.jsonl", ranked_records(2))
    assert main(["evaluate", "--bundle", tiny_bundle[0], "--data", data, "--format", "dmoerm"]) == 0
    assert any(line.split()[:2] == ["overall", "6"] for line in capsys.readouterr().out.splitlines())


@pytest.mark.slow
def test_label_and_train_commands_on_a_tiny_config(tmp_path, tiny_bert_dir, capsys, monkeypatch):
    import yaml

    monkeypatch.setenv("TQDM_DISABLE", "1")  # what --no-progress sets; restored afterwards
    hh = write_jsonl(tmp_path / "hh.jsonl", hh_records(60))
    quick = {"lr": 3e-3, "epochs": 1, "batch_size": 16, "patience": 1}
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "name": "tiny-cli", "output_dir": str(tmp_path / "run"),
        "taxonomy": [{"name": "greeting", "capabilities": ["politeness"]}],
        "data": {"sources": [{"path": hh, "format": "hh", "category": "greeting"}]},
        "labels": {"source": "dataset", "datasets": {"politeness": [{"path": hh, "format": "hh"}]}},
        "model": {"base": tiny_bert_dir, "max_length": 48, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
        "phase1": quick, "phase2": quick, "phase3": quick,
        "platform": {"storage_uri": str(tmp_path / "storage"), "tune": {"num_samples": 2, "max_epochs": 2,
                                                                          "grace_period": 1}}}))
    labelled = tmp_path / "labelled.jsonl"
    assert main(["label", "--config", str(config), "--output", str(labelled)]) == 0
    assert json.loads(capsys.readouterr().out)["written"] == len(labelled.read_text().splitlines()) > 0
    assert main(["train", "--config", str(config), "--no-progress", "phase2.epochs=2"]) == 0
    out = capsys.readouterr().out
    assert "DMoERM vs single RM" in out and f"bundle written to: {tmp_path / 'run' / 'bundle'}" in out
    assert (tmp_path / "run" / "bundle" / "bundle.json").exists()
    assert (tmp_path / "storage" / "stages" / "search").is_dir()  # the in-process aggregator search ran


def test_module_entry_point_help():
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "platform")}
    proc = subprocess.run([sys.executable, "-m", "dmoerm.cli", "--help"], capture_output=True, text=True, env=env,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    for command in ("train", "evaluate", "score", "label"):
        assert command in proc.stdout
