"""The outer sparse router: a classifier over task categories from the context alone.

It reads mean-pooled frozen hidden states of the context (no response): the states entering block
``layers`` of the base model over the last ``max_context_tokens`` tokens of the rendered context
(``RouterInput``). ``context_features`` computes them, for training and for scoring alike. For a
bidirectional encoder that is one cheap pass over each distinct context; for a causal decoder the
context's states are also the first positions of every scored (context, response) row, so the scorer
routes from its own trunk pass (``source="prefix"``) and a context pass is only needed where a row cut
the context.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from dmoerm.data.records import Turn
from dmoerm.modeling.backbone import Backbone, length_batches, pool

RouterSource = Literal["auto", "context", "prefix"]


@dataclass
class RouterInput:
    """What the router reads: the mean-pooled frozen hidden states of the context."""

    layers: int | None = None
    """Lower blocks of the frozen base model the features come from (0: the token embeddings; None: the
    whole trunk, ``num_layers - top_layers`` blocks). At most the trunk's depth; fewer is cheaper."""
    max_context_tokens: int | None = None
    """Route from the last N tokens of the rendered context only (the latest turns); None: as many as
    ``model.max_length`` allows."""
    source: RouterSource = "auto"
    """``context``: one pass over each distinct context alone. ``prefix`` (causal decoders only): the
    states of the context's positions in the scored (context, response) rows, read from the scorer's own
    trunk pass, so routing needs no pass of its own where the row holds the whole routed context (the
    decoder's head + context, without its end token). ``auto``: prefix for decoders, context for encoders."""

    def __post_init__(self) -> None:
        if self.layers is not None and self.layers < 0:
            raise ValueError(f"router.layers must be >= 0 (or null for the whole trunk), got {self.layers}")
        if self.max_context_tokens is not None and self.max_context_tokens < 1:
            raise ValueError(f"router.max_context_tokens must be >= 1 (or null), got {self.max_context_tokens}")
        if self.source not in ("auto", "context", "prefix"):
            raise ValueError(f"router.source must be auto, context or prefix, got {self.source!r}")

    def resolve(self, backbone: Backbone) -> RouterInput:
        """These settings checked against ``backbone``, with ``auto`` replaced by what it means there."""
        if self.layers is not None and self.layers > backbone.split:
            raise ValueError(f"router.layers must be in [0, {backbone.split}] (the frozen trunk of this "
                             f"{backbone.num_layers}-layer backbone with top_layers={backbone.top_layers}), "
                             f"got {self.layers}")
        if self.source == "prefix" and backbone.is_encoder:
            raise ValueError("router.source=prefix needs a causal decoder (an encoder's context states depend "
                             "on the response); use auto or context")
        source = self.source if self.source != "auto" else ("context" if backbone.is_encoder else "prefix")
        return RouterInput(self.layers, self.max_context_tokens, source)

    def depth(self, backbone: Backbone) -> int:
        """The block whose input states the router reads."""
        return backbone.split if self.layers is None else self.layers


class RouterHead(nn.Module):
    def __init__(self, hidden_size: int, categories: list[str], width: int = 0, dropout: float = 0.1,
                 inputs: RouterInput | None = None) -> None:
        super().__init__()
        if len(categories) < 1 or len(set(categories)) != len(categories):
            raise ValueError(f"router needs distinct category names, got {categories}")
        self.categories = list(categories)
        self.inputs = inputs or RouterInput()
        if width > 0:
            self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden_size, width), nn.GELU(),
                                     nn.Linear(width, len(categories)))
        else:
            self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden_size, len(categories)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, H) pooled context features (moved to the head's device) -> (B, C) float32 logits."""
        return self.net(features.to(self.net[-1].weight.device, torch.float32))


def prefix_mean(states: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(N, T, H) states, (N,) lengths -> (N, H) mean over each row's first ``lengths`` positions."""
    mask = torch.arange(states.size(1), device=states.device)[None, :] < lengths[:, None]  # (N, T)
    return pool(states, mask, "mean")


@torch.no_grad()
def context_features(backbone: Backbone, contexts: Sequence[Sequence[Turn]], inputs: RouterInput | None = None, *,
                     batch_size: int = 32, max_batch_tokens: int | None = None, progress: bool = False
                     ) -> torch.Tensor:
    """Router input of each context, the one definition used to train the router and to score.

    (N,) contexts -> (N, H): the states entering block ``inputs.layers`` over head + the last
    ``max_context_tokens`` context tokens (+ the tail token, except for ``prefix`` routing, whose
    features must match the context's positions inside a scored row), mean-pooled. Computed on the
    backbone's device, returned on the CPU in float32 (features are data; the head moves them).
    """
    inputs = (inputs or RouterInput()).resolve(backbone)
    rows = backbone.tokenize(contexts, [None] * len(contexts), max_context_tokens=inputs.max_context_tokens,
                             context_tail=inputs.source == "context")
    out = torch.zeros(len(contexts), backbone.hidden_size)
    bar = tqdm(total=len(contexts), desc="context features", unit="ctx", disable=not progress, leave=False)
    for idx in length_batches([len(r.ids) for r in rows], batch_size, max_batch_tokens):
        enc = backbone.pad([rows[i] for i in idx])
        states = backbone.block_inputs(enc, [inputs.depth(backbone)])[0]  # (B, T, H)
        out[idx] = prefix_mean(states, enc.attention_mask.sum(1)).cpu()  # (B, H)
        bar.update(len(idx))
    bar.close()
    return out
