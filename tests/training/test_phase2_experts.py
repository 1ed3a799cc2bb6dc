"""Phase 2: training one expert moves its own LoRA weights and value head and nothing else; every head
survives the bundle round trip."""

from __future__ import annotations

import pytest
import torch
from tiny import TINY_LORA, load_tiny, pairwise_samples

from dmoerm.bundle import load_bundle, save_bundle
from dmoerm.modeling.aggregator import Aggregator, AggregatorConfig
from dmoerm.modeling.reward_model import CategoryModel, RewardModel
from dmoerm.modeling.router import RouterHead
from dmoerm.modeling.top import TopStack, attach_experts
from dmoerm.training.features import TrunkCache
from dmoerm.training.loop import FitHooks, TrainConfig
from dmoerm.training.phases import capability_groups, train_expert

CAPS = ["empathy", "logic", "brevity"]


def _owner(name: str) -> str | None:
    """The capability a parameter belongs to (``...lora_A.<cap>.weight``, ``modules_to_save.<cap>.``)."""
    return next((c for c in CAPS if f".{c}." in name), None)


def test_each_expert_trains_only_its_own_adapter_and_value_head(tiny_bert_dir, tmp_path):
    backbone = load_tiny(tiny_bert_dir)
    samples = pairwise_samples(12)
    for i, s in enumerate(samples):  # each capability gets its own labels; "logic" prefers the other reply
        s.capability_prefs = {"empathy": [(0, 1)], "logic": [(1, 0)], "brevity": [(0, 1)] if i % 2 else [(1, 0)]}
    cache = TrunkCache(backbone, batch_size=8)
    cache.add_samples(samples, progress=False)
    experts = attach_experts(TopStack(backbone), CAPS, TINY_LORA)
    settings = TrainConfig(lr=1e-2, epochs=1, batch_size=8, max_steps=3, warmup_ratio=0.0)

    for cap in CAPS:
        before = {n: p.detach().clone() for n, p in experts.named_parameters()}
        groups = capability_groups(samples, cap, cache)
        result = train_expert(experts, cap, backbone, cache, groups[:9], groups[9:], settings,
                              hooks=FitHooks(progress=False))
        assert result.steps == 3
        after = dict(experts.named_parameters())
        changed = {n for n in before if not torch.equal(before[n], after[n])}
        assert f"base_model.model.value_head.modules_to_save.{cap}.weight" in changed
        assert any(f"lora_B.{cap}." in n for n in changed)
        stray = sorted(n for n in changed if _owner(n) != cap)
        assert not stray, f"training {cap!r} changed other weights: {stray[:5]}"
        base = [n for n in before if _owner(n) is None]  # top blocks, final norm, phase-1 head
        assert base and all(torch.equal(before[n], after[n]) for n in base)

    # the three heads were trained apart: they now differ from each other and from the phase-1 head
    heads = {c: experts.base_model.model.value_head.modules_to_save[c].weight.detach() for c in CAPS}
    phase1_head = experts.base_model.model.value_head.original_module.weight.detach()
    for c in CAPS:
        assert not torch.equal(heads[c], phase1_head)
    assert not torch.equal(heads["empathy"], heads["logic"]) and not torch.equal(heads["logic"], heads["brevity"])

    # every expert's head and adapter round-trip through the bundle, bit for bit
    torch.manual_seed(0)
    model = RewardModel(backbone, RouterHead(backbone.hidden_size, ["chat"]),
                        {"chat": CategoryModel("chat", CAPS, experts, Aggregator(3, backbone.hidden_size))})
    save_bundle(tmp_path / "bundle", model, lora=TINY_LORA, aggregator=AggregatorConfig(), router_width=0)
    loaded = load_bundle(tmp_path / "bundle").model.categories["chat"].experts
    saved_state, loaded_state = experts.state_dict(), loaded.state_dict()
    assert saved_state.keys() == loaded_state.keys()
    for c in CAPS:
        assert any(k.endswith(f"modules_to_save.{c}.weight") for k in loaded_state)
    for k, v in saved_state.items():
        assert torch.equal(v, loaded_state[k]), k


def test_train_expert_refuses_when_other_weights_are_trainable(tiny_bert_dir):
    backbone = load_tiny(tiny_bert_dir)
    cache = TrunkCache(backbone)
    samples = pairwise_samples(2)
    for s in samples:
        s.capability_prefs = {"empathy": [(0, 1)]}
    cache.add_samples(samples, progress=False)
    experts = attach_experts(TopStack(backbone), ["empathy", "logic"], TINY_LORA)
    experts.base_model.model.value_head.original_module.weight.requires_grad_(True)
    groups = capability_groups(samples, "empathy", cache)
    with pytest.raises(RuntimeError, match="trainable parameters outside its adapter"):
        train_expert(experts, "empathy", backbone, cache, groups, groups, TrainConfig(), hooks=FitHooks(progress=False))
