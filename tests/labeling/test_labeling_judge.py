"""The judge labeler against a real local chat-completions server (tests/fake_judge.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_sample
from fake_judge import FakeJudge, always_a, constant, per_capability, prefer_longer, prefer_marker

import dmoerm
from dmoerm.data.records import Turn
from dmoerm.labeling import (
    JudgeClient,
    JudgeConfig,
    JudgeError,
    judge_pair,
    label_samples,
    label_samples_async,
    parse_verdict,
)
from dmoerm.labeling.cache import count_answers

CAPS = {"chat": ["detail"]}


def three_responses(sample_id: str = "s0"):
    # lengths 1 < 3 < 2; human ranks tie responses 0 and 1 (they still get judged)
    return make_sample(sample_id, ["x", "xxxxxxxx", "xxxx"], ranks=[2, 2, 1])


@pytest.mark.parametrize("text, verdict", [
    ("A", "A"), ("B", "B"), ("b", "B"), ("Response A", "A"), ("**B**", "B"), ("A.", "A"), (" B\n", "B"),
    ("Answer: A", "A"), ("(B)", "B"), ("[[A]]", "A"), ("Response B is better", "B"), ("`A`", "A"),
    ("Both", None), ("A or B", None), ("AB", None), ("", None), (None, None), ("Neither.", None),
    ("I think A is better but B", None), ("Response", None),
])
def test_parse_verdict(text, verdict):
    assert parse_verdict(text) == verdict


@pytest.mark.parametrize("change, field", [
    ({"base_url": "localhost:8000"}, "base_url"), ({"base_url": "http://h/v1/chat/completions"}, "base_url"),
    ({"model": " "}, "model"), ({"api_key_env": "sk-abc123-secret"}, "api_key_env"),
    ({"concurrency": 0}, "concurrency"), ({"max_retries": -1}, "max_retries"),
    ({"timeout_s": 0}, "timeout_s"),
    ({"backoff_s": 2.0, "backoff_max_s": 1.0}, "backoff_max_s"), ({"max_tokens": 0}, "max_tokens"),
    ({"concurrency": True}, "concurrency"),
    ({"capability_descriptions": {"a": 1}}, "capability_descriptions"),
])
def test_config_validation_names_the_field(change, field):
    base = {"base_url": "http://127.0.0.1:1/v1", "model": "m"}
    with pytest.raises(ValueError, match=field):
        JudgeConfig(**{**base, **change})


def test_consistent_judge_labels_the_right_pairs(fake_judge, judge_cfg):
    s = three_responses()
    report = label_samples([s], CAPS, judge_cfg, progress=False)
    assert sorted(s.capability_prefs["detail"]) == [(1, 0), (1, 2), (2, 0)]  # longer is better
    assert (report.questions_total, report.asked, report.cache_hits) == (6, 6, 0)
    assert (report.consistent, report.inconsistent, report.abstained) == (3, 0, 0)
    assert report.per_capability == {"detail": {"consistent": 3, "inconsistent": 0, "abstained": 0}}
    assert report.prompt_tokens > 0 and report.completion_tokens == 6
    assert fake_judge.total_calls == 6


def test_position_biased_judge_yields_no_labels(fake_judge, judge_cfg):
    fake_judge.policy = always_a
    s = three_responses()
    report = label_samples([s], CAPS, judge_cfg, progress=False)
    assert s.capability_prefs["detail"] == []
    assert (report.consistent, report.inconsistent, report.abstained) == (0, 3, 0)


def test_each_capability_gets_its_own_verdicts_and_description(fake_judge, judge_cfg):
    fake_judge.policy = per_capability({"detail": prefer_longer,
                                        "politeness": prefer_marker("please", "**{}**")})
    cfg = dataclasses.replace(judge_cfg, capability_descriptions={"politeness": "courteous wording"})
    s = make_sample("p", ["please do", "do it now right away"], ranks=[1, 2])
    label_samples([s], {"chat": ["detail", "politeness"]}, cfg, progress=False)
    assert s.capability_prefs == {"detail": [(1, 0)], "politeness": [(0, 1)]}
    assert any("politeness: courteous wording?" in p for p in fake_judge.prompts)


def test_rerun_is_served_from_cache_and_does_not_duplicate_labels(fake_judge, judge_cfg):
    s = three_responses()
    label_samples([s], CAPS, judge_cfg, progress=False)
    report = label_samples([s], CAPS, judge_cfg, progress=False)
    assert (report.asked, report.cache_hits) == (0, 6)
    assert fake_judge.total_calls == 6
    assert sorted(s.capability_prefs["detail"]) == [(1, 0), (1, 2), (2, 0)]


def test_cache_is_keyed_by_judge_model(fake_judge, judge_cfg):
    label_samples([three_responses()], CAPS, judge_cfg, progress=False)
    report = label_samples([three_responses()], CAPS, dataclasses.replace(judge_cfg, model="other-judge"),
                           progress=False)
    assert report.asked == 6 and fake_judge.total_calls == 12


def test_identical_questions_are_asked_once(fake_judge, judge_cfg):
    twins = [make_sample("a", ["x", "xx"], [1, 2]), make_sample("a", ["x", "xx"], [1, 2])]
    twins[1].id = "b"  # same context and responses, different id
    report = label_samples(twins, CAPS, judge_cfg, progress=False)
    assert report.questions_total == 2 and fake_judge.total_calls == 2
    assert twins[0].capability_prefs == twins[1].capability_prefs == {"detail": [(1, 0)]}


@pytest.mark.parametrize("status", [429, 500, 503])
def test_transient_errors_are_retried_and_the_label_is_still_right(fake_judge, judge_cfg, status):
    fake_judge.fail_first, fake_judge.fail_status = 2, status
    s = three_responses()
    report = label_samples([s], CAPS, judge_cfg, progress=False)
    assert sorted(s.capability_prefs["detail"]) == [(1, 0), (1, 2), (2, 0)]
    assert report.retries == 12 and report.asked == 6
    assert set(fake_judge.calls.values()) == {3}


def test_retry_after_is_honoured(fake_judge, judge_cfg):
    fake_judge.fail_first, fake_judge.fail_status, fake_judge.retry_after = 2, 429, 0.3
    cfg = dataclasses.replace(judge_cfg, backoff_s=0.001, backoff_max_s=5.0)
    start = time.perf_counter()
    label_samples([make_sample("r", ["x", "xx"], [1, 2])], CAPS, cfg, progress=False)
    assert time.perf_counter() - start >= 0.6  # two waits of Retry-After: 0.3, not the 1 ms backoff


def test_timeouts_are_retried(fake_judge, judge_cfg):
    fake_judge.fail_first, fake_judge.fail_status, fake_judge.stall_s = 1, 0, 1.0
    cfg = dataclasses.replace(judge_cfg, timeout_s=0.25)
    s = make_sample("t", ["xx", "x"], [2, 1])
    report = label_samples([s], CAPS, cfg, progress=False)
    assert s.capability_prefs["detail"] == [(0, 1)]
    assert report.retries == 2 and set(fake_judge.calls.values()) == {2}


def test_connection_errors_are_retried_then_fail_clearly(judge_cfg):
    with FakeJudge() as gone:
        url = gone.url  # a port nobody listens on once the server is stopped
    cfg = dataclasses.replace(judge_cfg, base_url=url, max_retries=2)
    with pytest.raises(JudgeError, match=r"failed 3 times; last error: Connect"):
        label_samples([make_sample("c", ["x", "xx"], [1, 2])], CAPS, cfg, progress=False)


def test_retries_exhausted_raise_with_the_last_status(fake_judge, judge_cfg):
    fake_judge.fail_first, fake_judge.fail_status = 100, 503
    cfg = dataclasses.replace(judge_cfg, max_retries=1)
    with pytest.raises(JudgeError, match=r"failed 2 times; last error: HTTP 503: injected failure"):
        label_samples([make_sample("e", ["x", "xx"], [1, 2])], CAPS, cfg, progress=False)


def test_non_retryable_400_raises_with_status_and_message(fake_judge, judge_cfg):
    fake_judge.fail_first, fake_judge.fail_status = 1, 400
    s = make_sample("f", ["x", "xx"], [1, 2])
    with pytest.raises(JudgeError, match=r"HTTP 400: injected failure 1/1"):
        label_samples([s], CAPS, judge_cfg, progress=False)
    assert max(fake_judge.calls.values()) == 1  # never retried
    assert s.capability_prefs == {}  # samples untouched on failure


def test_garbage_answers_are_abstentions_and_are_cached(fake_judge, judge_cfg):
    fake_judge.policy = constant("Both responses are fine")
    s = three_responses()
    report = label_samples([s], CAPS, judge_cfg, progress=False)
    assert s.capability_prefs["detail"] == []
    assert (report.abstained, report.consistent, report.inconsistent) == (3, 0, 0)
    again = label_samples([s], CAPS, judge_cfg, progress=False)
    assert (again.asked, again.cache_hits, again.abstained) == (0, 6, 3)


def test_resume_after_a_failed_run_asks_no_question_twice(fake_judge, judge_cfg):
    samples = [make_sample(f"s{k}", ["x" * (k + 1), "y" * (k + 3), "z" * (k + 2)], [1, 2, 3])
               for k in range(5)]  # 5 samples x 3 pairs x 2 orders = 30 questions
    fake_judge.refuse_after_answers = 11
    with pytest.raises(JudgeError, match="HTTP 400"):
        label_samples(samples, CAPS, judge_cfg, progress=False)
    assert fake_judge.total_answered == 11 and all(s.capability_prefs == {} for s in samples)
    fake_judge.refuse_after_answers = None
    report = label_samples(samples, CAPS, judge_cfg, progress=False)
    assert (report.cache_hits, report.asked) == (11, 19)
    assert len(fake_judge.answered) == 30 and max(fake_judge.answered.values()) == 1
    assert all(sorted(s.capability_prefs["detail"]) == [(1, 0), (1, 2), (2, 0)] for s in samples)


def test_resume_after_cancellation_mid_run(fake_judge, judge_cfg):
    fake_judge.latency_s = 0.05
    samples = [make_sample(f"s{k}", ["x" * (k + 1), "y" * (k + 3)], [1, 2]) for k in range(12)]  # 24 qs

    def committed() -> int:  # a second reader of the stored answer objects, as another process would be
        return count_answers(judge_cfg.cache_path)

    async def run_then_cancel() -> None:
        task = asyncio.ensure_future(label_samples_async(samples, CAPS, judge_cfg, progress=False))
        while committed() < 8:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run_then_cancel())
    num_committed = committed()
    assert 8 <= num_committed < 24
    while fake_judge.inflight:  # let the server finish the requests the cancelled run abandoned
        time.sleep(0.01)
    before = fake_judge.total_answered
    report = label_samples(samples, CAPS, judge_cfg, progress=False)
    assert (report.cache_hits, report.asked) == (num_committed, 24 - num_committed)
    assert fake_judge.total_answered - before == 24 - num_committed  # nothing committed is asked again
    # only requests in flight at the moment of cancellation (at most `concurrency`) were paid twice
    assert fake_judge.total_answered - 24 <= judge_cfg.concurrency
    assert all(s.capability_prefs["detail"] == [(1, 0)] for s in samples)


def test_concurrency_is_bounded(fake_judge, judge_cfg):
    fake_judge.latency_s = 0.03
    samples = [make_sample(f"s{k}", ["x" * (k + 1), "y" * (k + 3)], [1, 2]) for k in range(10)]
    label_samples(samples, CAPS, dataclasses.replace(judge_cfg, concurrency=3), progress=False)
    assert 1 < fake_judge.max_inflight <= 3


def test_api_key_is_sent_as_bearer_and_never_stored(fake_judge, judge_cfg, monkeypatch, caplog):
    secret = "sk-test-7f3a9c-never-store-me"
    monkeypatch.setenv("DMOERM_TEST_JUDGE_KEY", secret)
    cfg = dataclasses.replace(judge_cfg, api_key_env="DMOERM_TEST_JUDGE_KEY")
    with caplog.at_level("DEBUG"):
        label_samples([three_responses()], CAPS, cfg, progress=False)
    assert fake_judge.auth_headers == [f"Bearer {secret}"] * 6
    stored = b"".join(p.read_bytes() for p in Path(cfg.cache_path).rglob("*") if p.is_file())
    assert b'"content"' in stored and secret.encode() not in stored
    assert secret not in caplog.text and secret not in repr(cfg)


def test_no_key_in_environment_sends_no_authorization(fake_judge, judge_cfg, monkeypatch):
    monkeypatch.delenv("DMOERM_TEST_JUDGE_KEY", raising=False)
    cfg = dataclasses.replace(judge_cfg, api_key_env="DMOERM_TEST_JUDGE_KEY")
    label_samples([make_sample("n", ["x", "xx"], [1, 2])], CAPS, cfg, progress=False)
    assert fake_judge.auth_headers == [None, None]


@pytest.mark.parametrize("category, match", [(None, "sample bad-1: category is None"),
                                             ("poetry", "sample bad-1: category 'poetry'")])
def test_samples_without_a_known_category_are_refused_before_any_call(fake_judge, judge_cfg, category, match):
    samples = [three_responses("ok"), make_sample("bad-1", ["x", "xx"], [1, 2], category=category)]
    with pytest.raises(ValueError, match=match):
        label_samples(samples, CAPS, judge_cfg, progress=False)
    assert fake_judge.total_calls == 0


def test_judge_pair_asks_both_orders(fake_judge, judge_cfg):
    s = three_responses()

    async def go():
        async with JudgeClient(judge_cfg) as client:
            return await judge_pair(client, s, 0, 1, "detail")

    assert asyncio.run(go()) == (1, 0)
    fake_judge.policy = always_a
    assert asyncio.run(go()) is None


_CHILD = """
import sys
from dmoerm.data.records import Sample, Turn
from dmoerm.labeling import JudgeConfig, label_samples
samples = [Sample(id=f"s{k}", context=[Turn("user", f"q{k}")], responses=["x" * (k + 1), "y" * (k + 3)],
                  ranks=[1, 2], category="chat") for k in range(30)]
cfg = JudgeConfig(base_url=sys.argv[1], model="fake-judge", concurrency=4, cache_path=sys.argv[2])
label_samples(samples, {"chat": ["detail"]}, cfg, progress=False)
"""


def test_a_killed_labeling_process_loses_no_committed_answer(fake_judge, judge_cfg):
    fake_judge.latency_s = 0.05
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(dmoerm.__file__).parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, fake_judge.url, judge_cfg.cache_path], env=env)
    try:
        deadline = time.monotonic() + 30
        while fake_judge.total_answered < 12 and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
    finally:
        child.send_signal(signal.SIGKILL)  # no cleanup, no finally blocks: a real crash
        child.wait()
    while fake_judge.inflight:
        time.sleep(0.01)
    num_committed = count_answers(judge_cfg.cache_path)
    assert 12 - judge_cfg.concurrency <= num_committed < 60
    before = fake_judge.total_answered
    samples = [make_sample(f"s{k}", ["x" * (k + 1), "y" * (k + 3)], [1, 2]) for k in range(30)]
    for k, s in enumerate(samples):
        s.context[0] = Turn("user", f"q{k}")
    report = label_samples(samples, CAPS, dataclasses.replace(judge_cfg, concurrency=4), progress=False)
    assert (report.cache_hits, report.asked) == (num_committed, 60 - num_committed)
    assert fake_judge.total_answered - before == 60 - num_committed
    assert all(s.capability_prefs["detail"] == [(1, 0)] for s in samples)
