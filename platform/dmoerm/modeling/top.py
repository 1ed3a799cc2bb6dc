"""The trainable top of the backbone: top blocks, final norm, pooling and a scalar value head.

One ``TopStack`` per category. Phase 1 fine-tunes it whole; phase 2 wraps it once with peft and adds
one LoRA adapter per capability with ``add_adapter`` (never nested ``get_peft_model`` calls), the value
head listed in ``modules_to_save`` so every expert owns, trains and saves its own copy of the head.
A capability's adapter is called ``adapter_name(capability)`` (its ``dmoerm.names.safe_name``: peft and
torch refuse dots and some words as adapter names); callers pass capability names, never adapter names.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from dmoerm.device import autocast, module_device, round_features
from dmoerm.modeling.backbone import Backbone, pool
from dmoerm.names import safe_name


@dataclass
class LoraConfig:
    """LoRA hyperparameters of the capability experts (paper: r=32, alpha=32, q/v, dropout 0.05)."""

    r: int = 32
    """Rank of the update matrices."""
    alpha: int = 32
    """Scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: list[str] | None = None
    """Linear layer names in the top blocks; None picks q/v projections (q_proj/v_proj or query/value)."""

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha < 1:
            raise ValueError(f"lora.r and lora.alpha must be >= 1, got r={self.r} alpha={self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")




class TopStack(nn.Module):
    """Top blocks + final norm + pooling + value head: trunk hidden states in, (pooled, score) out.

    Built on the backbone's device; its forward runs in the backbone's precision (bf16 autocast on CUDA
    for ``bfloat16``) and, in training with ``gradient_checkpointing``, recomputes each block's
    activations in the backward pass."""

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        blocks, norm = backbone.top_modules()
        self.blocks = nn.ModuleList(copy.deepcopy(b) for b in blocks)
        self.norm = copy.deepcopy(norm)
        self.pooling = backbone.pooling
        self.value_head = nn.Linear(backbone.hidden_size, 1)
        nn.init.normal_(self.value_head.weight, std=1.0 / (backbone.hidden_size + 1))
        nn.init.zeros_(self.value_head.bias)
        self.precision = backbone.precision
        self.gradient_checkpointing = backbone.gradient_checkpointing
        self.requires_grad_(True)
        self.to(backbone.device)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor, layer_args: tuple = (),
                layer_kwargs: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, T, H) trunk states -> pooled (N, H) last hidden states and float32 scores (N,)."""
        layer_kwargs = layer_kwargs or {}
        checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        with autocast(hidden.device, self.precision):
            for block in self.blocks:
                if checkpoint:
                    from torch.utils.checkpoint import checkpoint as recompute

                    out = recompute(block, hidden, *layer_args, use_reentrant=False, **layer_kwargs)
                else:
                    out = block(hidden, *layer_args, **layer_kwargs)
                hidden = out[0] if isinstance(out, tuple) else out  # (N, T, H)
            hidden = self.norm(hidden)
            pooled = pool(hidden, attention_mask, self.pooling)  # (N, H)
            scores = self.value_head(pooled).squeeze(-1)  # (N,)
        return pooled, scores.float()


def default_target_modules(top: nn.Module) -> list[str]:
    names = {n.rsplit(".", 1)[-1] for n, m in top.named_modules() if isinstance(m, nn.Linear)}
    for pair in (["q_proj", "v_proj"], ["query", "value"], ["q", "v"], ["c_attn"], ["qkv_proj"], ["Wqkv"]):
        if set(pair) <= names:
            return pair
    raise ValueError(f"cannot guess LoRA target modules among {sorted(names)}; set lora.target_modules")


def adapter_name(capability: str) -> str:
    """The peft adapter of ``capability``'s expert (``helpful`` -> ``helpful``, ``logic.v2`` -> ``logic_v2-<hash>``)."""
    return safe_name(capability)


def attach_experts(top: TopStack, capabilities: list[str], lora: LoraConfig) -> nn.Module:
    """Wrap ``top`` once and add one adapter per capability (named ``adapter_name(capability)``); every
    adapter starts from ``top``'s weights (LoRA B = 0) and from a copy of its phase-1 value head."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    if not capabilities:
        raise ValueError("a category needs at least one capability expert")
    adapters = [adapter_name(c) for c in capabilities]
    if len(set(adapters)) != len(adapters):
        raise ValueError(f"duplicate capability (or adapter) names: {capabilities} -> {adapters}")
    cfg = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                     target_modules=lora.target_modules or default_target_modules(top),
                     modules_to_save=["value_head"], bias="none")
    model = get_peft_model(top, cfg, adapter_name=adapters[0])
    for name in adapters[1:]:
        model.add_adapter(name, cfg)
    model.set_adapter(adapters[0])
    return model.to(module_device(top))  # the adapters on the top's device


ADAPTER_CONTAINERS = frozenset({"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector",
                                "modules_to_save"})
"""peft's per-adapter containers: a parameter ``....<container>.<adapter>[.<tensor>]`` is that adapter's."""


def owned_by(name: str, capability: str) -> bool:
    """Whether a parameter of the peft-wrapped top belongs to ``capability``'s expert (LoRA or value head):
    its name has the capability's adapter as the key right after one of peft's per-adapter containers (an
    exact component match, so a capability called ``model`` or ``weight`` owns only its own tensors)."""
    adapter, parts = adapter_name(capability), name.split(".")
    return any(c in ADAPTER_CONTAINERS and a == adapter for c, a in zip(parts, parts[1:]))


@dataclass
class ExpertOutput:
    pooled: torch.Tensor  # (B, K, H) each expert's last hidden state
    scores: torch.Tensor  # (B, K) each expert's value-head score
    capabilities: list[str] = field(default_factory=list)


@torch.no_grad()
def run_experts(experts: nn.Module, capabilities: list[str], backbone: Backbone, hidden: torch.Tensor,
                attention_mask: torch.Tensor) -> ExpertOutput:
    """All K experts on B inputs in ONE batched forward: rows repeated K times, one adapter per row.

    (B, T, H) trunk states -> pooled (B, K, H) rounded to the backbone's precision (``round_features``: what
    phase 3 caches and what scoring feeds the aggregator), float32 scores (B, K).
    """
    k, b = len(capabilities), hidden.size(0)
    h = hidden.repeat(k, 1, 1)  # (K*B, T, H): row k*B + i is expert k on input i
    m = attention_mask.repeat(k, 1)  # (K*B, T)
    args, kwargs = backbone.layer_inputs(attention_mask, repeat=k)  # built for B rows, repeated to K*B
    names = [adapter_name(c) for c in capabilities for _ in range(b)]
    pooled, scores = experts(h, m, args, kwargs, adapter_names=names)  # (K*B, H), (K*B,)
    pooled = round_features(pooled, backbone.precision).view(k, b, -1).transpose(0, 1)  # (B, K, H)
    return ExpertOutput(pooled=pooled, scores=scores.view(k, b).T, capabilities=list(capabilities))
