"""The uncertainty-penalised DMoERM reward: the experts' spread of standardised scores on hand-made scores and
statistics, the statistics of a real (tiny) model, and their bundle form."""

from __future__ import annotations

import math

import pytest
from tiny import build_reward_model, pairwise_samples, tiny_backbone

from dmoerm.modeling.reward_model import Score
from dmoerm.uncertainty import (
    PenalisedRewardModel,
    bundle_capability_stats,
    capability_stats,
    expert_spread,
    penalised_rewards,
    standardised,
    stats_from_meta,
    stats_to_meta,
)

pytestmark = pytest.mark.usefixtures("torch_single_thread")
STATS = {"chat": {"empathy": (1.0, 2.0), "logic": (-1.0, 0.5)}, "qa": {"correctness": (0.0, 1.0)}}


def _score(reward: float, category: str, **caps: float) -> Score:
    return Score(reward, category, 1.0, caps)


def test_spread_and_penalty_on_hand_made_scores():
    agree = _score(2.0, "chat", empathy=3.0, logic=0.0)  # z = (3-1)/2 = 1, (0+1)/0.5 = 2
    apart = _score(2.0, "chat", empathy=-3.0, logic=1.0)  # z = -2, 4
    alone = _score(0.5, "qa", correctness=7.0)  # one expert: no spread
    assert standardised(agree, STATS) == {"empathy": 1.0, "logic": 2.0}
    spread = expert_spread([[agree, apart], [alone]], STATS)
    assert spread == [[pytest.approx(0.5), pytest.approx(3.0)], [0.0]]  # population std of (1, 2) and (-2, 4)
    assert penalised_rewards([[agree, apart], [alone]], STATS, weight=0.5) == [
        [pytest.approx(1.75), pytest.approx(0.5)], [0.5]]
    assert penalised_rewards([[agree, apart]], STATS, weight=0.0) == [[2.0, 2.0]]  # weight 0: the plain reward


def test_a_constant_expert_and_missing_statistics():
    stats = {"chat": {"empathy": (1.0, 0.0), "logic": (0.0, 1.0)}}
    assert standardised(_score(0.0, "chat", empathy=5.0, logic=2.0), stats) == {"empathy": 0.0, "logic": 2.0}
    with pytest.raises(ValueError, match="no capability statistics for category 'qa'"):
        expert_spread([[_score(0.0, "qa", correctness=1.0)]], stats)
    with pytest.raises(ValueError, match="lack experts \\['tone'\\]"):
        expert_spread([[_score(0.0, "chat", empathy=1.0, logic=1.0, tone=0.0)]], stats)
    with pytest.raises(ValueError, match=">= 0"):
        penalised_rewards([], stats, -1.0)


def test_statistics_of_a_model_are_the_mean_and_std_of_its_expert_scores():
    model = build_reward_model(tiny_backbone(), {"chat": ["empathy", "logic"], "qa": ["correctness"]})
    samples = pairwise_samples(5, category="chat") + pairwise_samples(3, category="qa", offset=5)
    stats = capability_stats(model, samples)
    scored = model.score_samples(samples, use_known_category=True)
    emp = [s.capability_scores["empathy"] for row in scored[:5] for s in row]
    mean = sum(emp) / len(emp)
    assert stats["chat"]["empathy"] == pytest.approx((mean, math.sqrt(sum((v - mean) ** 2 for v in emp) / len(emp))))
    assert set(stats) == {"chat", "qa"} and set(stats["qa"]) == {"correctness"}
    z = [[list(standardised(s, stats).values()) for s in row] for row in scored[:5]]
    assert sum(v[0] for row in z for v in row) == pytest.approx(0.0, abs=1e-5)  # standardised on these rows
    only_chat = capability_stats(model, samples[:5])
    assert set(only_chat) == {"chat"}  # a category with no rows has no statistics
    penalised = PenalisedRewardModel(model, stats, weight=2.0).score_samples(samples, use_known_category=True)
    assert penalised == penalised_rewards(scored, stats, 2.0)
    assert penalised[0] != [s.reward for s in scored[0]]  # two experts: a real penalty


def test_bundle_form_roundtrip_and_fallback(caplog):
    meta = {"capability_stats": stats_to_meta(STATS)}
    assert stats_from_meta(meta) == STATS
    assert stats_from_meta({}) is None
    model = build_reward_model(tiny_backbone(), {"chat": ["empathy", "logic"]})
    assert bundle_capability_stats(meta, model) == STATS  # stored: the given samples are not used
    with pytest.raises(ValueError, match="no capability_stats"):
        bundle_capability_stats({}, model)
    computed = bundle_capability_stats({}, model, pairwise_samples(3, category="chat"))
    assert computed == capability_stats(model, pairwise_samples(3, category="chat"))
    assert "computing them from 3 given samples" in caplog.text
