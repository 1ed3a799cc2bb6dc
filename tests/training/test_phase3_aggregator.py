"""Phase 3 trains the aggregator on expert features computed once: the frozen experts never run per step."""

from __future__ import annotations

import math

import pytest
import torch
from tiny import TINY_LORA, load_tiny, pairwise_samples, perturb_
from torch import nn

import dmoerm.modeling.top as top_module
import dmoerm.training.phases as phases
from dmoerm.modeling.aggregator import AggregatorConfig
from dmoerm.modeling.top import TopStack, attach_experts
from dmoerm.training.features import TrunkCache
from dmoerm.training.loop import FitHooks, Group, TrainConfig

CAPS = ["empathy", "logic"]
QUIET = FitHooks(progress=False)


@pytest.fixture
def setup(tiny_bert_dir):
    backbone = load_tiny(tiny_bert_dir)
    samples = pairwise_samples(20)
    cache = TrunkCache(backbone, batch_size=16)
    cache.add_samples(samples, progress=False)
    top = TopStack(backbone)
    experts = attach_experts(top, CAPS, TINY_LORA)
    perturb_(experts, ["lora_", "modules_to_save"])
    calls = {"forward": 0, "run_experts": 0}
    top.register_forward_pre_hook(lambda *_: calls.__setitem__("forward", calls["forward"] + 1))
    return backbone, samples, cache, experts, calls


def _count_run_experts(monkeypatch, calls):
    real = top_module.run_experts

    def counting(*args, **kwargs):
        calls["run_experts"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(phases, "run_experts", counting)
    monkeypatch.setattr(top_module, "run_experts", counting)


def test_train_aggregator_never_calls_the_experts(setup, monkeypatch):
    backbone, samples, cache, experts, calls = setup
    _count_run_experts(monkeypatch, calls)
    rows = list(range(len(cache)))
    feats = phases.expert_features(experts, CAPS, backbone, cache, rows, batch_size=16, progress=False)
    assert feats.shape == (len(rows), 2, backbone.hidden_size)
    assert calls == {"forward": math.ceil(len(rows) / 16), "run_experts": math.ceil(len(rows) / 16)}
    calls.update(forward=0, run_experts=0)
    frozen = feats.clone()
    groups = phases.human_groups(samples, cache)
    agg, result = phases.train_aggregator(feats, groups[:15], groups[15:], AggregatorConfig(),
                                          TrainConfig(lr=1e-2, epochs=5, batch_size=8, patience=5), hooks=QUIET)
    assert result.steps >= 10 and calls == {"forward": 0, "run_experts": 0}
    assert torch.equal(feats, frozen)
    # the paper's shape by default: Linear(K*H, H) -> PReLU -> Linear(H, 1)
    linears = [m for m in agg.net if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(2 * 32, 32), (32, 1)]
    assert any(isinstance(m, nn.PReLU) for m in agg.net)
    assert agg(feats[:4]).shape == (4,)


def test_phase3_runs_the_experts_once_per_feature_batch_whatever_the_epochs(setup, monkeypatch):
    """What the ``features`` and ``aggregator`` stages run: features once, then any number of epochs."""
    backbone, samples, cache, experts, calls = setup
    _count_run_experts(monkeypatch, calls)
    feats, train, val = phases.phase3_features(experts, CAPS, backbone, cache, samples[:14], samples[14:],
                                               batch_size=8, progress=False)  # (R, K, H)
    agg, result = phases.train_aggregator(feats, train, val, AggregatorConfig(),
                                          TrainConfig(lr=1e-2, epochs=8, batch_size=8, patience=8), hooks=QUIET)
    num_rows = 2 * len(samples)
    assert feats.shape == (num_rows, 2, backbone.hidden_size)
    assert result.steps >= 8
    assert calls == {"forward": math.ceil(num_rows / 8), "run_experts": math.ceil(num_rows / 8)}
    assert agg.num_experts == 2


def test_no_phase3_pairs_raises_naming_the_phase():
    feats = torch.zeros(4, 2, 8)
    with pytest.raises(ValueError, match="^phase3: no training pairs"):
        phases.train_aggregator(feats, [Group([0, 1], []), Group([2, 3], [])], [], AggregatorConfig(), TrainConfig(),
                                hooks=QUIET)
