"""Router input: states entering block ``layers`` over the last ``max_context_tokens`` context tokens, one
definition for training and scoring; decoders route from the scored rows' own trunk prefix."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import build_reward_model, minilm_tokenizer, tiny_backbone, tiny_model, user

from dmoerm.config import RouterConfig
from dmoerm.data.records import Turn
from dmoerm.modeling import reward_model as reward_model_module
from dmoerm.modeling.backbone import build_backbone, render_context
from dmoerm.modeling.router import RouterInput, context_features

CONTEXTS = [user("a much longer context than the others, with many many words in it"), user("hi"),
            [Turn("user", "what is two plus two"), Turn("assistant", "four"), Turn("user", "and times three?")]]
TAXONOMY = {"chat": ["empathy", "logic"], "qa": ["correctness"]}


def _manual(bb, ids: list[int], depth: int) -> torch.Tensor:
    """Mean over the row of the hidden states entering block ``depth``, from HF's own hidden_states."""
    with torch.no_grad():
        out = bb.model(input_ids=torch.tensor([ids]), output_hidden_states=True, use_cache=False)
    return out.hidden_states[depth][0].mean(0)  # (H,)


@pytest.mark.parametrize("kind", ["bert", "llama"])
@pytest.mark.parametrize("layers", [0, 1, None])
def test_router_features_at_depth_d_equal_a_manual_forward_to_that_block(kind, layers):
    bb = tiny_backbone(kind, top_layers=1)  # 3 blocks, trunk = 2
    inputs = RouterInput(layers=layers, source="context")
    feats = context_features(bb, CONTEXTS, inputs, batch_size=2)  # (3, H), padded batches
    depth = bb.split if layers is None else layers
    for i, c in enumerate(CONTEXTS):
        ids = bb.encode([c], [None]).input_ids[0].tolist()
        torch.testing.assert_close(feats[i], _manual(bb, ids, depth), atol=1e-5, rtol=0)
    if layers == 0:
        assert not torch.allclose(feats, context_features(bb, CONTEXTS, RouterInput(source="context")))


def test_max_context_tokens_keeps_the_last_tokens():
    bb = tiny_backbone("bert", max_length=64)
    tok = minilm_tokenizer()
    ctx = user(" ".join(f"w{i}" for i in range(40)) + " final question")
    full = tok(render_context(ctx), add_special_tokens=False)["input_ids"]
    row = bb.tokenize([ctx], [None], max_context_tokens=6)[0]
    assert row.ids == [tok.cls_token_id] + full[-6:] + [tok.sep_token_id]
    assert (row.context_end, row.context_dropped, row.response_dropped) == (7, len(full) - 6, 0)
    assert "assistant :" in tok.decode(row.ids).lower()
    feats = context_features(bb, [ctx, user("short")], RouterInput(layers=1, max_context_tokens=6))
    torch.testing.assert_close(feats[0], _manual(bb, row.ids, 1), atol=1e-5, rtol=0)
    short = bb.tokenize([user("short")], [None], max_context_tokens=6)[0]
    assert short.context_dropped == 0 and short.ids == bb.tokenize([user("short")], [None])[0].ids


@pytest.mark.parametrize(("kwargs", "message"), [({"layers": -1}, "router.layers must be >= 0"),
                                                 ({"max_context_tokens": 0}, "router.max_context_tokens"),
                                                 ({"source": "rows"}, "router.source")])
def test_bad_router_inputs_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RouterConfig(**kwargs)


def test_router_inputs_are_checked_against_the_backbone():
    bb = tiny_backbone("bert", top_layers=1)
    with pytest.raises(ValueError, match=r"router.layers must be in \[0, 2\]"):
        RouterInput(layers=3).resolve(bb)
    with pytest.raises(ValueError, match="router.source=prefix needs a causal decoder"):
        build_reward_model(bb, TAXONOMY, router_inputs=RouterInput(source="prefix"))
    assert RouterInput().resolve(bb).source == "context"
    assert RouterInput(layers=1).resolve(tiny_backbone("llama")) == RouterInput(1, None, "prefix")


def _decoder(with_specials: bool):
    tok = minilm_tokenizer()
    if with_specials:  # a head (bos) and a tail (eos) token, like real decoders
        tok = copy.deepcopy(tok)
        tok.bos_token, tok.eos_token = "[CLS]", "[SEP]"
    return build_backbone(tiny_model("llama"), tok, top_layers=1, max_length=40, reference="tiny-llama")


@pytest.mark.parametrize("with_specials", [False, True])
@pytest.mark.parametrize("layers", [None, 1])
def test_decoder_prefix_routing_equals_the_context_pass_and_changes_no_reward(monkeypatch, with_specials, layers):
    bb = _decoder(with_specials)
    inputs = RouterInput(layers=layers, max_context_tokens=24, source="prefix")
    model = build_reward_model(bb, TAXONOMY, router_inputs=inputs, batch_size=3)
    long_ctx = user(" ".join(f"w{i}" for i in range(30)))  # > 24 tokens: no row holds the routed context
    cut = user("tell me about " + "x " * 12)  # fits the router, but a long response cuts it in its row
    contexts = [CONTEXTS[0], CONTEXTS[1], CONTEXTS[2], CONTEXTS[1], long_ctx, cut, cut]
    responses = ["fine", "yo there", "twelve", "hey", "ok", "a " * 40, "short"]
    passed: list[int] = []
    real = reward_model_module.context_features
    monkeypatch.setattr(reward_model_module, "context_features",
                        lambda b, ctx, *a, **k: passed.append(len(ctx)) or real(b, ctx, *a, **k))
    scores = model.score(contexts, responses)
    assert passed == [1]  # only long_ctx needed a context pass (cut is routed from its "short" row)
    assert scores[5].context_tokens_dropped > 0 and scores[6].context_tokens_dropped == 0
    names, probs, _ = model.route(contexts)  # every context by the separate context pass
    assert [s.category for s in scores] == names
    assert [s.category_prob for s in scores] == pytest.approx(probs, abs=1e-5)
    forced = model.score(contexts, responses, names)
    assert [s.reward for s in scores] == pytest.approx([s.reward for s in forced], abs=1e-6)
    ctx_only = bb.tokenize([CONTEXTS[0]], [None], context_tail=False)[0].ids
    assert ctx_only == bb.tokenize([CONTEXTS[0]], ["fine"])[0].ids[: len(ctx_only)]  # a prefix of the row
