"""The judge's answer cache: keyed by the question, on local or S3 storage, one object per paid answer."""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import sqlite3
from pathlib import Path

import pytest
from fake_judge import FakeJudge

from dmoerm.data.records import Sample, Turn
from dmoerm.labeling import JudgeConfig, JudgeError, label_samples
from dmoerm.labeling.cache import AnswerCache, answer_uri, count_answers, import_sqlite, model_dir
from dmoerm.labeling.prompts import build_messages, question_sha256

CAPS = {"chat": ["detail", "tone"]}


def samples(ids: range) -> list[Sample]:
    return [Sample(id=f"s{k}", context=[Turn("user", f"question {k}")], category="chat", ranks=[1, 2, 3],
                   responses=["x" * (k + 1), "y" * (k + 3), "z" * (k + 2)]) for k in ids]


def question_keys(batch: list[Sample], caps: dict[str, list[str]]) -> list[tuple[str, str]]:
    """The cache keys ``label_samples`` uses: (sha256 of the question, order) per pair and order."""
    out = []
    for s in batch:
        for cap in caps[s.category]:
            for i in range(len(s.responses)):
                for j in range(i + 1, len(s.responses)):
                    for order, (a, b) in (("ab", (i, j)), ("ba", (j, i))):
                        out.append((question_sha256(build_messages(s.context, s.responses[a], s.responses[b],
                                                                   cap)), order))
    return out


def repeated(judge: FakeJudge) -> int:
    """Questions the judge answered more than once (paid twice)."""
    return sum(n - 1 for n in judge.answered.values())


def test_answers_are_objects_named_by_the_question(fake_judge, judge_cfg):
    label_samples(samples(range(2)), CAPS, judge_cfg, progress=False)  # 2 x 2 caps x 3 pairs x 2 orders
    assert count_answers(judge_cfg.cache_path) == 24 == fake_judge.total_answered
    s = samples(range(1))[0]
    msgs = build_messages(s.context, s.responses[0], s.responses[1], "tone")
    sha = question_sha256(msgs)
    path = Path(answer_uri(judge_cfg.cache_path, "fake-judge", sha, "ab"))
    assert path == Path(judge_cfg.cache_path) / model_dir("fake-judge") / sha[:2] / f"{sha}-ab.json"
    obj = json.loads(path.read_text())
    assert obj["model"] == "fake-judge" and obj["order"] == "ab" and obj["content"] == "B"  # "yyyy" is longer


def test_new_samples_other_batches_and_orders_re_ask_nothing(fake_judge, judge_cfg):
    label_samples(samples(range(6)), CAPS, judge_cfg, progress=False)
    first = fake_judge.total_answered
    # more samples, in other batches (as other shards or workers would get them), in another order
    everything = samples(range(8))[::-1]
    for batch in (everything[:3], everything[3:5], everything[5:]):
        label_samples(batch, CAPS, dataclasses.replace(judge_cfg, concurrency=2), progress=False)
    assert fake_judge.total_answered - first == 2 * 12  # only the two new samples' questions
    assert repeated(fake_judge) == 0


def test_a_renamed_model_folder_is_safe_and_distinct():
    assert "/" not in model_dir("meta-llama/Llama-3-70B") and ".." not in model_dir("..")
    assert model_dir("a/b") != model_dir("a_b")


def test_shared_s3_cache_serves_another_node(fake_judge, judge_cfg, s3_server, tmp_path, monkeypatch):
    bucket = s3_server.create_bucket("judge-cache-test")
    cfg = dataclasses.replace(judge_cfg, cache_path=f"s3://{bucket}/run-{tmp_path.name}/judge-cache")
    monkeypatch.setenv("DMOERM_LOCAL_CACHE", str(tmp_path / "node-1"))
    label_samples(samples(range(3)), CAPS, cfg, progress=False)
    assert count_answers(cfg.cache_path) == 36 == fake_judge.total_answered
    # another node: an empty local mirror, the same storage
    monkeypatch.setenv("DMOERM_LOCAL_CACHE", str(tmp_path / "node-2"))
    got = samples(range(3))
    report = label_samples(got, CAPS, cfg, progress=False)
    assert (report.asked, report.cache_hits) == (0, 36) and fake_judge.total_answered == 36
    assert all(sorted(s.capability_prefs["tone"]) == [(1, 0), (1, 2), (2, 0)] for s in got)
    keys = question_keys(got, CAPS)
    with AnswerCache(cfg.cache_path) as cache:  # node 2's mirror has them now: no object is read again
        assert len(cache.get_many("fake-judge", keys)) == 36 and cache.num_objects_read == 0
    monkeypatch.setenv("DMOERM_LOCAL_CACHE", str(tmp_path / "node-3"))
    with AnswerCache(cfg.cache_path) as cache:  # a third node reads them from S3
        assert len(cache.get_many("fake-judge", keys)) == 36 and cache.num_objects_read == 36


def test_a_broken_answer_object_is_asked_again_with_a_warning(fake_judge, judge_cfg, caplog):
    label_samples(samples(range(1)), {"chat": ["detail"]}, judge_cfg, progress=False)
    broken = next(Path(judge_cfg.cache_path).rglob("*-ab.json"))
    broken.write_text("{not json")
    with caplog.at_level(logging.WARNING):
        report = label_samples(samples(range(1)), {"chat": ["detail"]}, judge_cfg, progress=False)
    assert (report.asked, report.cache_hits) == (1, 5)
    assert str(broken) in caplog.text and "asked again" in caplog.text


def test_an_old_sqlite_cache_file_is_refused_and_can_be_imported(fake_judge, judge_cfg, tmp_path):
    old = tmp_path / "judge.sqlite"  # answers from an earlier run ...
    label_samples(samples(range(1)), CAPS, dataclasses.replace(judge_cfg, cache_path=str(tmp_path / "seed")),
                  progress=False)
    db = sqlite3.connect(old)  # ... in the old one-file layout
    db.execute("CREATE TABLE answers (model TEXT, question_sha256 TEXT, question_order TEXT, content TEXT, "
               "prompt_tokens INTEGER, completion_tokens INTEGER, created_at REAL)")
    for p in (tmp_path / "seed").rglob("*.json"):
        o = json.loads(p.read_text())
        db.execute("INSERT INTO answers VALUES (?, ?, ?, ?, ?, ?, 0)", (o["model"], o["question_sha256"], o["order"],
                                                                       o["content"], o["prompt_tokens"], 1))
    db.commit()
    db.close()
    with pytest.raises(ValueError, match="is a file .*import_sqlite"):
        label_samples(samples(range(1)), CAPS, dataclasses.replace(judge_cfg, cache_path=str(old)), progress=False)
    assert import_sqlite(old, judge_cfg.cache_path) == 12
    before = fake_judge.total_answered
    report = label_samples(samples(range(1)), CAPS, judge_cfg, progress=False)
    assert report.asked == 0 and fake_judge.total_answered == before


def test_credentials_in_the_base_url_are_used_but_never_shown(fake_judge, judge_cfg, caplog):
    host = fake_judge.url.removeprefix("http://")
    cfg = dataclasses.replace(judge_cfg, base_url=f"http://judge-user:pl4nted-url-pass@{host}")
    label_samples(samples(range(1)), {"chat": ["detail"]}, cfg, progress=False)
    assert fake_judge.auth_headers[0] == "Basic " + base64.b64encode(b"judge-user:pl4nted-url-pass").decode()
    assert "pl4nted-url-pass" not in repr(cfg) and "judge-user" not in cfg.public_url
    fake_judge.fail_first, fake_judge.fail_status = 1, 400
    with caplog.at_level(logging.DEBUG), pytest.raises(JudgeError) as err:
        label_samples(samples(range(5, 6)), {"chat": ["detail"]}, cfg, progress=False)
    assert "HTTP 400" in str(err.value) and "pl4nted-url-pass" not in str(err.value)
    assert "pl4nted-url-pass" not in caplog.text
    stored = b"".join(p.read_bytes() for p in Path(cfg.cache_path).rglob("*") if p.is_file())
    assert b"pl4nted-url-pass" not in stored


def test_in_memory_cache_is_announced(fake_judge, judge_cfg, caplog):
    with caplog.at_level(logging.WARNING):
        label_samples(samples(range(1)), {"chat": ["detail"]}, dataclasses.replace(judge_cfg, cache_path=None),
                      progress=False)
    assert "in memory" in caplog.text


def test_judge_config_round_trips_a_folder(tmp_path):
    cfg = JudgeConfig(base_url="http://127.0.0.1:1/v1", model="m", cache_path=tmp_path / "c")
    assert cfg.cache_path == str(tmp_path / "c")
