"""Evaluation on hand-made rewards: a pair is right only when the better-ranked response scores strictly
higher; ties in reward count as wrong, ties in rank are no pair at all."""

from __future__ import annotations

import math

import pytest

from dmoerm.data.records import Sample, Turn
from dmoerm.evaluation import EvalReport, accuracy_by_category, confusion_matrix, evaluate, pair_outcomes
from dmoerm.modeling.reward_model import Score


def _s(sid: str, ranks: list[int], category: str | None = "chat") -> Sample:
    return Sample(id=sid, context=[Turn("user", f"q {sid}")], responses=[f"{sid}-r{i}" for i in range(len(ranks))],
                  ranks=ranks, category=category)


SAMPLES = [_s("a", [1, 2]), _s("b", [2, 1]), _s("c", [1, 2, 3], "qa"), _s("d", [1, 1], "qa"), _s("e", [2, 1], None)]
REWARDS = [[0.9, 0.1],  # rank 1 higher: right
           [0.9, 0.1],  # rank 1 is response 1, scored lower: wrong
           [3.0, 3.0, 1.0],  # (0,1) tied reward: wrong; (0,2) right; (1,2) right
           [5.0, 0.0],  # tied ranks: no pair, whatever the rewards
           [0.0, 0.5]]  # right; no category


def test_pair_outcomes_follow_rank_one_is_best_and_skip_rank_ties():
    out = pair_outcomes(SAMPLES, REWARDS)
    assert {k: (o.category, o.correct) for k, o in out.items()} == {
        "a#0>1": ("chat", True), "b#1>0": ("chat", False), "c#0>1": ("qa", False), "c#0>2": ("qa", True),
        "c#1>2": ("qa", True), "e#1>0": ("uncategorised", True)}


def test_accuracy_by_category_and_overall():
    acc = accuracy_by_category(pair_outcomes(SAMPLES, REWARDS))
    assert list(acc) == ["chat", "qa", "uncategorised", "overall"]
    assert acc["chat"] == {"accuracy": 0.5, "pairs": 2}
    assert acc["qa"]["accuracy"] == pytest.approx(2 / 3) and acc["qa"]["pairs"] == 3
    assert acc["overall"] == {"accuracy": pytest.approx(4 / 6), "pairs": 6}
    assert accuracy_by_category({}) == {}


def test_mismatched_reward_lists_are_errors():
    with pytest.raises(ValueError, match="2 samples but 1 reward lists"):
        pair_outcomes(SAMPLES[:2], REWARDS[:1])
    with pytest.raises(ValueError, match="sample a: 3 rewards for 2 responses"):
        pair_outcomes(SAMPLES[:1], [[1.0, 2.0, 3.0]])


def test_confusion_matrix_rows_are_true_columns_are_routed():
    true = ["chat", "chat", "qa", "qa", "qa", "other"]
    pred = ["chat", "qa", "qa", "qa", "chat", "chat"]
    assert confusion_matrix(true, pred, ["chat", "qa"]) == [[1, 1], [1, 2]]  # unknown true labels are skipped


class _Fake:
    """Duck-typed RewardModel: fixed rewards, routes every sample to ``chat``."""

    categories = {"chat": None, "qa": None}

    def score_samples(self, samples):
        return [[Score(r, "chat", 0.9, {}) for r in rewards] for rewards in REWARDS[: len(samples)]]


class _FakeBaseline:
    def score_samples(self, samples):
        return [[float(-s.ranks[i]) for i in range(len(s.ranks))] for s in samples]  # always right


def test_evaluate_reports_routed_accuracy_router_accuracy_and_a_table():
    report = evaluate(_Fake(), SAMPLES, _FakeBaseline())
    assert isinstance(report, EvalReport)
    assert report.dmoerm["overall"]["accuracy"] == pytest.approx(4 / 6)
    assert report.baseline["overall"]["accuracy"] == 1.0
    assert report.router_accuracy == pytest.approx(2 / 4)  # a, b right; c, d (qa) routed to chat; e unknown
    assert report.confusion == [[2, 0], [2, 0]]
    m = report.metrics()
    assert m["dmoerm/acc/qa"] == pytest.approx(2 / 3) and m["baseline/acc/overall"] == 1.0
    assert m["router/accuracy"] == 0.5
    table = report.table().splitlines()
    assert table[0].split() == ["category", "pairs", "DMoERM", "single", "RM", "delta"]
    assert table[-2].split() == ["overall", "6", "0.667", "1.000", "-0.333"]
    assert table[-1].startswith("router accuracy: 0.500")


def test_evaluate_without_known_categories_or_baseline():
    unknown = [_s("x", [1, 2], None)]
    report = evaluate(_Fake(), unknown)
    assert math.isnan(report.router_accuracy) and report.baseline is None
    assert report.table().splitlines()[2].split()[-2:] == ["-", "-"]
