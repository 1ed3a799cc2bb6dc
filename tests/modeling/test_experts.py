"""Phase-2 experts: one peft wrapper, one adapter + value head per capability, all run in one batch."""

from __future__ import annotations

import pytest
import torch
from tiny import TINY_LORA, perturb_, tiny_backbone, user

from dmoerm.modeling.top import TopStack, attach_experts, default_target_modules, run_experts

CAPS = ["empathy", "logic", "correctness"]
CONTEXTS = [user("hello, how are you?"), user("what is the capital of France and why?"), user("hi")]
RESPONSES = ["fine, thank you for asking", "Paris, because history made it so", "hey there, friend"]


def _inputs(bb):
    enc = bb.encode(CONTEXTS, RESPONSES)
    return bb.trunk(enc), enc.attention_mask


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_mixed_adapter_batch_equals_one_adapter_at_a_time(kind):
    bb = tiny_backbone(kind)
    experts = attach_experts(TopStack(bb), CAPS, TINY_LORA)
    touched = perturb_(experts, ["lora_", "modules_to_save"])
    assert any("lora_B" in n for n in touched) and any("modules_to_save" in n for n in touched)
    experts.eval()
    hidden, mask = _inputs(bb)
    mixed = run_experts(experts, CAPS, bb, hidden, mask)
    assert mixed.pooled.shape == (3, len(CAPS), bb.hidden_size) and mixed.scores.shape == (3, len(CAPS))
    assert mixed.capabilities == CAPS
    args, kwargs = bb.layer_inputs(mask)
    for k, cap in enumerate(CAPS):
        experts.set_adapter(cap)
        with torch.no_grad():
            pooled, scores = experts(hidden, mask, args, kwargs)
        torch.testing.assert_close(mixed.pooled[:, k], pooled, atol=1e-5, rtol=0)
        torch.testing.assert_close(mixed.scores[:, k], scores, atol=1e-5, rtol=0)
    # the adapters really differ, so a mix-up of rows and adapters would have shown
    for k in range(1, len(CAPS)):
        assert (mixed.scores[:, k] - mixed.scores[:, 0]).abs().min() > 1e-3
        assert (mixed.pooled[:, k] - mixed.pooled[:, 0]).abs().max() > 1e-3


def test_fresh_experts_start_from_the_phase1_top_and_its_value_head():
    bb = tiny_backbone("bert")
    top = TopStack(bb).eval()
    perturb_(top, ["value_head"], scale=1.0)
    hidden, mask = _inputs(bb)
    args, kwargs = bb.layer_inputs(mask)
    with torch.no_grad():
        pooled, scores = top(hidden, mask, args, kwargs)
    experts = attach_experts(top, CAPS, TINY_LORA).eval()
    out = run_experts(experts, CAPS, bb, hidden, mask)
    for k in range(len(CAPS)):
        torch.testing.assert_close(out.pooled[:, k], pooled, atol=1e-6, rtol=0)
        torch.testing.assert_close(out.scores[:, k], scores, atol=1e-6, rtol=0)


def test_one_wrapper_with_an_adapter_and_a_value_head_per_capability():
    bb = tiny_backbone("llama")
    experts = attach_experts(TopStack(bb), CAPS, TINY_LORA)
    assert list(experts.peft_config) == CAPS
    names = [n for n, _ in experts.named_parameters()]
    assert sum("base_model.model.base_model" in n for n in names) == 0  # not nested wrappers
    for cap in CAPS:
        assert f"base_model.model.value_head.modules_to_save.{cap}.weight" in names
        assert any(f"q_proj.lora_A.{cap}." in n for n in names) and any(f"v_proj.lora_B.{cap}." in n for n in names)
    assert not any("k_proj.lora" in n or "o_proj.lora" in n for n in names)


def test_default_lora_targets_follow_the_architecture():
    assert default_target_modules(TopStack(tiny_backbone("bert"))) == ["query", "value"]
    assert default_target_modules(TopStack(tiny_backbone("llama"))) == ["q_proj", "v_proj"]


@pytest.mark.parametrize(("caps", "message"), [([], "at least one capability"), (["a", "a"], "duplicate")])
def test_bad_capability_lists_are_rejected(caps, message):
    with pytest.raises(ValueError, match=message):
        attach_experts(TopStack(tiny_backbone("bert")), caps, TINY_LORA)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_experts_on_layer_inputs_built_once_equal_the_ones_built_for_k_times_the_rows(kind):
    bb = tiny_backbone(kind)
    experts = attach_experts(TopStack(bb), CAPS, TINY_LORA)
    perturb_(experts, ["lora_", "modules_to_save"])
    experts.eval()
    hidden, mask = _inputs(bb)
    out = run_experts(experts, CAPS, bb, hidden, mask)
    k, b = len(CAPS), hidden.size(0)
    m = mask.repeat(k, 1)  # (K*B, T)
    args, kwargs = bb.layer_inputs(m)  # the arguments built for all K*B rows
    with torch.no_grad():
        pooled, scores = experts(hidden.repeat(k, 1, 1), m, args, kwargs,
                                 adapter_names=[c for c in CAPS for _ in range(b)])
    torch.testing.assert_close(out.pooled, pooled.view(k, b, -1).transpose(0, 1), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.scores, scores.view(k, b).T, atol=1e-6, rtol=0)
