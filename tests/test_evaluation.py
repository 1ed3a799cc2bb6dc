"""Evaluation on hand-made rewards: a pair is right only when the better-ranked response scores strictly
higher; ties in reward count as wrong, ties in rank are no pair at all."""

from __future__ import annotations

import pytest

from dmoerm.data.records import Sample, Turn
from dmoerm.evaluation import EvalReport, accuracy_by_category, confusion_matrix, evaluate, pair_outcomes
from dmoerm.modeling.reward_model import Score
from dmoerm.significance import paired_bootstrap


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
    assert table[5].split() == ["overall", "6", "0.667", "1.000", "-0.333"]
    assert sum(line.startswith("router accuracy: 0.500") for line in table) == 1


def test_evaluate_without_known_categories_or_baseline_prints_no_router_figures():
    unknown = [_s("x", [1, 2], None)]
    report = evaluate(_Fake(), unknown)
    assert report.router_accuracy is None and report.confusion is None and report.baseline is None
    assert "router/accuracy" not in report.metrics() and report.interval is None
    table = report.table()
    assert table.splitlines()[2].split()[-2:] == ["-", "-"]
    assert "router" not in table and "nan" not in table


def test_categories_that_are_not_the_models_are_reported_as_subsets_not_router_classes():
    subsets = [_s("a", [1, 2], "math"), _s("b", [2, 1], "code"), _s("c", [1, 2, 3], "chat")]
    report = evaluate(_Fake(), subsets, _FakeBaseline())
    assert report.grouping == "subset" and report.router_accuracy is None and report.confusion is None
    assert list(report.dmoerm) == ["chat", "code", "math", "overall"]
    assert report.dmoerm["math"] == {"accuracy": 1.0, "pairs": 1} and report.dmoerm["code"]["accuracy"] == 0.0
    assert "router/accuracy" not in report.metrics() and report.metrics()["dmoerm/acc/math"] == 1.0
    table = report.table()
    assert table.splitlines()[0].split()[0] == "subset" and "subsets: the data's own labels" in table
    assert "router accuracy" not in table and "[[" not in table and "nan" not in table


def test_the_difference_interval_is_the_shared_paired_bootstrap_and_both_outcomes_are_kept():
    report = evaluate(_Fake(), SAMPLES, _FakeBaseline())
    expected = paired_bootstrap({k: o.correct for k, o in report.outcomes.items()},
                                {k: o.correct for k, o in report.baseline_outcomes.items()})
    assert report.interval == expected and expected.num_pairs == 6 and expected.num_samples == 4
    assert report.interval.delta == pytest.approx(4 / 6 - 1.0)
    assert f"DMoERM - single RM: {expected}" in report.table().splitlines()
    assert report.paired_counts() == {"both_right": 4, "dmoerm_only": 0, "baseline_only": 2, "both_wrong": 0}
    m = report.metrics()
    assert (m["delta/overall"], m["delta/ci_low"], m["delta/ci_high"]) == (expected.delta, expected.low,
                                                                           expected.high)
    data = report.to_dict()
    assert data["interval"]["low"] == expected.low and data["interval"]["num_samples"] == 4
    assert data["pairs"]["b#1>0"] == {"category": "chat", "dmoerm": False, "baseline": True}
    assert set(data["pairs"]) == set(report.outcomes)


def test_notes_are_printed_at_the_end_of_the_table():
    report = evaluate(_Fake(), SAMPLES, _FakeBaseline())
    report.notes.append("data budget: DMoERM 10 samples, single RM 10 samples")
    assert report.table().splitlines()[-1] == "data budget: DMoERM 10 samples, single RM 10 samples"
    assert report.to_dict()["notes"] == report.notes


def test_no_pair_to_score_is_an_error_not_an_empty_table():
    tied = [_s("t1", [1, 1]), _s("t2", [2, 2, 2], "qa")]
    with pytest.raises(ValueError, match="no pairs to evaluate: 2 sample"):
        evaluate(_Fake(), tied, _FakeBaseline())
    with pytest.raises(ValueError, match="no pairs to evaluate"):
        evaluate(_Fake(), [])


def test_repeated_sample_ids_are_an_error_not_merged_pairs():
    with pytest.raises(ValueError, match="1 sample id.* more than once: 'a' \\(2x\\)"):
        evaluate(_Fake(), [_s("a", [1, 2]), _s("a", [2, 1])])
