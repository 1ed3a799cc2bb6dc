"""Evaluation on a real tiny model with a short ``max_length``: truncation is counted and reported, and a
pair whose responses are the same input once cut is reported apart instead of counted wrong for both."""

from __future__ import annotations

import logging
import statistics

import pytest
from tiny import build_reward_model, tiny_backbone, user

from dmoerm.data.records import Sample
from dmoerm.evaluation import evaluate
from dmoerm.modeling.reward_model import SingleRewardModel
from dmoerm.modeling.top import TopStack

pytestmark = pytest.mark.usefixtures("torch_single_thread")

TAXONOMY = {"chat": ["empathy", "logic"], "qa": ["correctness"]}
HEAD = " ".join(["gamma"] * 30)  # longer than max_length=24 alone


@pytest.fixture(scope="module")
def models():
    bb = tiny_backbone("bert", max_length=24)
    return build_reward_model(bb, TAXONOMY), SingleRewardModel(bb, TopStack(bb))


SAMPLES = [
    Sample("ident", user("hi"), [HEAD + " alpha", HEAD + " beta"], [1, 2], "chat"),
    Sample("ok", user("hello there"), ["fine thanks", "go away"], [1, 2], "chat"),
    Sample("three", user("what is 2+2?"), [HEAD + " four", HEAD + " five", "no idea"], [1, 2, 3], "qa"),
]


def test_identical_after_truncation_pairs_are_reported_not_scored(models, caplog):
    model, baseline = models
    with caplog.at_level(logging.WARNING, logger="dmoerm.evaluation"):
        report = evaluate(model, SAMPLES, baseline)
    assert report.identical_pairs == ["ident#0>1", "three#0>1"]
    assert sorted(report.outcomes) == sorted(report.baseline_outcomes) == ["ok#0>1", "three#0>2", "three#1>2"]
    assert report.dmoerm["overall"]["pairs"] == 3 and report.interval.num_pairs == 3
    assert report.metrics()["eval/identical_pairs"] == 2.0
    assert report.to_dict()["identical_after_truncation"] == ["ident#0>1", "three#0>1"]
    assert any("identical after truncation: 2 pair(s) not scored" in line for line in report.table().splitlines())
    assert "2 pair(s) are identical inputs after truncation" in caplog.text


def test_truncation_is_counted_and_warned_above_the_threshold(models, caplog):
    model, baseline = models
    flat = model.score([s.context for s in SAMPLES for _ in s.responses], [r for s in SAMPLES for r in s.responses])
    cut = [s for s in flat if s.response_tokens_dropped > 0]
    assert len(cut) == 4  # the four long responses
    with caplog.at_level(logging.WARNING, logger="dmoerm.evaluation"):
        report = evaluate(model, SAMPLES, baseline)
    t = report.truncation
    assert (t.rows, t.truncated_rows, t.response_truncated_rows) == (7, 4, 4)
    assert t.context_truncated_rows == sum(s.context_tokens_dropped > 0 for s in flat) == 2  # "what is 2+2?"
    assert t.response_tokens_dropped == sum(s.response_tokens_dropped for s in flat)
    assert t.context_tokens_dropped == sum(s.context_tokens_dropped for s in flat) > 0
    assert t.median_response_kept == pytest.approx(
        statistics.median(s.response_tokens / (s.response_tokens + s.response_tokens_dropped) for s in cut))
    assert 0 < t.median_response_kept < 1 and t.max_length == 24
    assert report.metrics()["truncation/rows_truncated_fraction"] == pytest.approx(4 / 7)
    lines = report.table().splitlines()
    assert any(line.startswith("truncation: 4 of 7 rows (57%) cut at max_length 24: 4 responses") for line in lines)
    assert lines[-1].startswith("WARNING: 57% of the rows were truncated (above 10%)")
    assert "57% of the rows were truncated" in caplog.text
    quiet = evaluate(model, SAMPLES, baseline, truncation_warning=0.6)
    assert quiet.notes == [] and quiet.truncation == t


def test_every_pair_identical_after_truncation_is_an_error(models):
    model, baseline = models
    with pytest.raises(ValueError, match="no pairs to evaluate: all 1 pairs are identical inputs after truncation"):
        evaluate(model, SAMPLES[:1], baseline)
