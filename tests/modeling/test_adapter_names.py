"""Capability names that are not plain adapter names (a dot, a torch attribute such as ``train``) still get
their own expert, and ``owned_by`` matches a parameter to an adapter exactly: a capability called ``model``
or ``weight`` owns its own six tensors, not every parameter whose path contains the word."""

from __future__ import annotations

import pytest
import torch
from tiny import TINY_LORA, load_tiny, pairwise_samples, perturb_, user

from dmoerm.modeling.top import TopStack, adapter_name, attach_experts, owned_by, run_experts
from dmoerm.training.features import TrunkCache
from dmoerm.training.loop import FitHooks, TrainConfig
from dmoerm.training.phases import capability_groups, train_expert

CAPS = ["model", "weight", "logic.v2", "train", "base_model", "empathy"]
PER_EXPERT = 6  # LoRA A and B on the query and value projections of the one top block, and the head's weight, bias


@pytest.fixture(scope="module")
def backbone(tiny_bert_dir):
    return load_tiny(tiny_bert_dir)


def test_owned_by_partitions_the_adapter_parameters_exactly(backbone):
    experts = attach_experts(TopStack(backbone), CAPS, TINY_LORA)
    assert list(experts.peft_config) == [adapter_name(c) for c in CAPS]
    assert adapter_name("model") == "model" and adapter_name("empathy") == "empathy"
    names = list(experts.state_dict())
    owners = {n: [c for c in CAPS if owned_by(n, c)] for n in names}
    for cap in CAPS:
        mine = [n for n in names if cap in owners[n]]
        assert len(mine) == PER_EXPERT, (cap, mine)
    assert all(len(o) <= 1 for o in owners.values()), {n: o for n, o in owners.items() if len(o) > 1}
    shared = [n for n, o in owners.items() if not o]  # the top block, final norm and the phase-1 head
    assert shared and not any(("lora_" in n or "modules_to_save" in n) for n in shared), shared
    assert "base_model.model.value_head.original_module.weight" in shared


def test_the_isolation_guard_sees_a_stray_trainable_weight_for_a_capability_called_model(backbone):
    cache = TrunkCache(backbone)
    samples = pairwise_samples(2)
    for s in samples:
        s.capability_prefs = {"model": [(0, 1)]}
    cache.add_samples(samples, progress=False)
    experts = attach_experts(TopStack(backbone), ["model", "logic"], TINY_LORA)
    experts.base_model.model.value_head.original_module.weight.requires_grad_(True)
    groups = capability_groups(samples, "model", cache)
    with pytest.raises(RuntimeError, match="trainable parameters outside its adapter"):
        train_expert(experts, "model", backbone, cache, groups, groups, TrainConfig(), hooks=FitHooks(progress=False))


def test_experts_with_awkward_names_train_only_their_own_weights(backbone):
    caps = ["logic.v2", "model", "train"]
    samples = pairwise_samples(12)
    for i, s in enumerate(samples):
        s.capability_prefs = {"logic.v2": [(0, 1)], "model": [(1, 0)], "train": [(0, 1)] if i % 2 else [(1, 0)]}
    cache = TrunkCache(backbone, batch_size=8)
    cache.add_samples(samples, progress=False)
    experts = attach_experts(TopStack(backbone), caps, TINY_LORA)
    settings = TrainConfig(lr=1e-2, epochs=1, batch_size=8, max_steps=2, warmup_ratio=0.0)
    for cap in caps:
        before = {n: p.detach().clone() for n, p in experts.named_parameters()}
        groups = capability_groups(samples, cap, cache)
        train_expert(experts, cap, backbone, cache, groups[:9], groups[9:], settings, hooks=FitHooks(progress=False))
        changed = {n for n, p in experts.named_parameters() if not torch.equal(before[n], p)}
        assert changed and all(owned_by(n, cap) for n in changed), (cap, sorted(changed)[:4])
        assert f"base_model.model.value_head.modules_to_save.{adapter_name(cap)}.weight" in changed


def test_run_experts_scores_each_awkward_capability_with_its_own_adapter(backbone):
    experts = attach_experts(TopStack(backbone), CAPS, TINY_LORA)
    perturb_(experts, ["lora_", "modules_to_save"])
    experts.eval()
    enc = backbone.encode([user("what is 2 + 2?")] * 2, ["4", "five"])
    hidden = backbone.trunk(enc)
    out = run_experts(experts, CAPS, backbone, hidden, enc.attention_mask)
    for k, cap in enumerate(CAPS):
        experts.set_adapter(adapter_name(cap))
        with torch.no_grad():
            _, alone = experts(hidden, enc.attention_mask, *backbone.layer_inputs(enc.attention_mask))
        torch.testing.assert_close(out.scores[:, k], alone, atol=1e-5, rtol=0)
    assert len({round(float(out.scores[0, k]), 4) for k in range(len(CAPS))}) == len(CAPS)  # six distinct experts
