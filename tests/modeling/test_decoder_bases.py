"""Decoder bases (Llama- and Qwen2-shaped): every block may sit on top (the paper's recipe: the trunk is the
embeddings' output), batches are right-padded whatever the tokenizer's padding side or pad token, and
last-token pooling reads each row's last real token."""

from __future__ import annotations

import pytest
import torch
from tiny import NUM_LAYERS, pairwise_samples
from tiny_decoders import decoder_backbone

from dmoerm.modeling.backbone import pool
from dmoerm.modeling.top import LoraConfig, TopStack, attach_experts, run_experts

CASES = [("llama", "llama"), ("qwen2", "qwen2"), ("llama", "qwen2"), ("qwen2", "bare")]
IDS = ["llama-left-no-pad", "qwen2-right-eos-pad", "llama-bpe", "qwen2-no-special-tokens"]


def _rows(n: int = 5):
    samples = pairwise_samples(n)
    return [s.context for s in samples for _ in s.responses], [r for s in samples for r in s.responses]


@pytest.mark.parametrize(("kind", "style"), CASES, ids=IDS)
def test_every_block_on_top_reproduces_the_whole_decoder(kind, style):
    bb = decoder_backbone(kind, style, top_layers=NUM_LAYERS)
    assert bb.split == 0 and bb.pooling == "last"
    contexts, responses = _rows()
    enc = bb.encode(contexts, responses)
    assert bool((enc.attention_mask[:, 0] == 1).all())  # right-padded: every row starts in column 0
    assert torch.equal(enc.attention_mask, torch.sort(enc.attention_mask, dim=1, descending=True).values)
    trunk = bb.trunk(enc)  # (N, T, H): what block 0 receives, the embeddings
    torch.testing.assert_close(trunk, bb.model.get_input_embeddings()(enc.input_ids), atol=0, rtol=0)

    top = TopStack(bb).eval()
    assert len(top.blocks) == NUM_LAYERS
    args, kwargs = bb.layer_inputs(enc.attention_mask)
    with torch.no_grad():
        pooled, _ = top(trunk, enc.attention_mask, args, kwargs)  # (N, H)
    full = bb.full_forward(enc)  # (N, T, H) after the final norm
    last = enc.attention_mask.sum(1) - 1
    torch.testing.assert_close(pooled, full[torch.arange(full.size(0)), last], atol=1e-5, rtol=1e-5)
    for i in (0, len(contexts) - 1):  # a batched row is the row alone
        one = bb.encode([contexts[i]], [responses[i]])
        a, k = bb.layer_inputs(one.attention_mask)
        with torch.no_grad():
            alone, _ = top(bb.trunk(one), one.attention_mask, a, k)
        torch.testing.assert_close(alone[0], pooled[i], atol=1e-5, rtol=1e-5)


def test_the_papers_lora_experts_sit_on_every_block():
    bb = decoder_backbone("qwen2", top_layers=NUM_LAYERS)
    experts = attach_experts(TopStack(bb), ["logic", "empathy"],
                             LoraConfig(r=32, alpha=32, dropout=0.05, target_modules=["q_proj", "v_proj"]))
    wrapped = {n.split(".lora_A")[0] for n, _ in experts.named_parameters() if ".lora_A.logic" in n}
    assert len(wrapped) == 2 * NUM_LAYERS and {w.rsplit(".", 1)[-1] for w in wrapped} == {"q_proj", "v_proj"}
    contexts, responses = _rows(3)
    enc = bb.encode(contexts, responses)
    out = run_experts(experts.eval(), ["logic", "empathy"], bb, bb.trunk(enc), enc.attention_mask)
    assert out.pooled.shape == (len(contexts), 2, bb.hidden_size)


@pytest.mark.parametrize("top_layers", [0, NUM_LAYERS + 1])
def test_top_layers_beyond_every_block_names_the_range(top_layers):
    with pytest.raises(ValueError, match=rf"model.top_layers must be in \[1, {NUM_LAYERS}\]"):
        decoder_backbone("llama", top_layers=top_layers)


def test_last_token_pooling_reads_the_mask_on_either_side():
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float32).view(2, 4, 1)  # (N, T, H): value = position
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])
    assert pool(hidden, right, "last").flatten().tolist() == [1.0, 7.0]
    assert pool(hidden, left, "last").flatten().tolist() == [3.0, 7.0]
    assert pool(hidden, torch.zeros(2, 4, dtype=torch.long), "last").flatten().tolist() == [0.0, 4.0]


def test_a_tokenizer_without_pad_or_eos_pads_with_zero_ids():
    bb = decoder_backbone("qwen2", "bare", top_layers=1)
    assert bb.tokenizer.pad_token_id is None and bb.pad_id == 0
    contexts, responses = _rows(2)
    enc = bb.encode(contexts, responses)
    assert int(enc.input_ids[enc.attention_mask == 0].abs().sum()) == 0
