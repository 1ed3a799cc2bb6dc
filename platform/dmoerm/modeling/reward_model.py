"""The composed DMoERM: route each conversation, then score it with its category's inner MoE.

Scoring is batched end to end: rows are length-sorted into batches, the shared trunk runs once per row,
and within a batch each category present runs all its K experts in ONE mixed-adapter forward (one
adapter per row) followed by its aggregator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from dmoerm.data.records import Sample, Turn
from dmoerm.modeling.aggregator import Aggregator
from dmoerm.modeling.backbone import Backbone
from dmoerm.modeling.router import RouterHead
from dmoerm.modeling.top import TopStack, run_experts


@dataclass
class CategoryModel:
    """One category's inner dense MoE."""

    name: str
    capabilities: list[str]
    experts: nn.Module  # peft-wrapped TopStack, one adapter per capability
    aggregator: Aggregator


@dataclass
class Score:
    reward: float
    category: str
    category_prob: float
    capability_scores: dict[str, float]


def _length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


def _per_sample(samples: Sequence[Sample], flat: list) -> list[list]:
    """Regroup one flat list (a value per response, samples in order) into one list per sample."""
    out, k = [], 0
    for s in samples:
        out.append(flat[k: k + len(s.responses)])
        k += len(s.responses)
    return out


def _approx_lengths(contexts: Sequence[Sequence[Turn]], responses: Sequence[str]) -> list[int]:
    return [sum(len(t.content) for t in c) + len(r) for c, r in zip(contexts, responses)]


class RewardModel:
    """DMoERM: ``router`` picks a category per context; that category's experts and aggregator score."""

    def __init__(self, backbone: Backbone, router: RouterHead, categories: dict[str, CategoryModel],
                 batch_size: int = 32) -> None:
        if list(categories) != router.categories:
            raise ValueError(f"router categories {router.categories} != inner models {list(categories)}")
        self.backbone, self.router, self.categories = backbone, router.eval(), categories
        self.batch_size = batch_size
        for cat in categories.values():
            cat.experts.eval()
            cat.aggregator.eval()

    @torch.no_grad()
    def route(self, contexts: Sequence[Sequence[Turn]]) -> tuple[list[str], list[float], torch.Tensor]:
        """Category name, its probability and the full (N, C) probabilities per context."""
        from dmoerm.training.features import context_features

        unique: dict[str, int] = {}
        distinct: list[list[Turn]] = []
        index = []
        for c in contexts:
            key = repr([(t.role, t.content) for t in c])
            if key not in unique:
                unique[key] = len(distinct)
                distinct.append(list(c))
            index.append(unique[key])
        feats = context_features(self.backbone, distinct, self.batch_size)  # (U, H)
        probs = self.router(feats).softmax(-1)[index]  # (N, C)
        best = probs.argmax(-1)
        names = [self.router.categories[i] for i in best.tolist()]
        return names, probs.gather(1, best[:, None]).squeeze(1).tolist(), probs

    @torch.no_grad()
    def score(self, contexts: Sequence[Sequence[Turn]], responses: Sequence[str],
              categories: Sequence[str | None] | None = None) -> list[Score]:
        """One ``Score`` per (context, response) row. ``categories`` forces a category per row."""
        if len(contexts) != len(responses):
            raise ValueError(f"{len(contexts)} contexts for {len(responses)} responses")
        if not responses:
            return []
        forced = list(categories) if categories is not None else [None] * len(contexts)
        for c in forced:
            if c is not None and c not in self.categories:
                raise ValueError(f"unknown category {c!r}; this model has {list(self.categories)}")
        names: list[str] = [c or "" for c in forced]
        probs = [1.0] * len(contexts)
        todo = [i for i, c in enumerate(forced) if c is None]
        if len(self.categories) == 1:
            names = [next(iter(self.categories))] * len(contexts)
        elif todo:  # route only the rows without a forced category
            routed, routed_probs, _ = self.route([contexts[i] for i in todo])
            for i, n, p in zip(todo, routed, routed_probs):
                names[i], probs[i] = n, p
        out: list[Score | None] = [None] * len(responses)
        for batch in _length_batches(_approx_lengths(contexts, responses), self.batch_size):
            enc = self.backbone.encode([list(contexts[i]) for i in batch], [responses[i] for i in batch])
            hidden = self.backbone.trunk(enc)  # (B, T, H)
            for cat_name in sorted({names[i] for i in batch}):
                local = [j for j, i in enumerate(batch) if names[i] == cat_name]
                cat = self.categories[cat_name]
                ex = run_experts(cat.experts, cat.capabilities, self.backbone, hidden[local],
                                 enc.attention_mask[local])
                rewards = cat.aggregator(ex.pooled)  # (b,)
                for j, r, s in zip(local, rewards.tolist(), ex.scores.tolist()):
                    i = batch[j]
                    out[i] = Score(r, cat_name, probs[i], dict(zip(cat.capabilities, s)))
        return out  # type: ignore[return-value]

    def score_samples(self, samples: Sequence[Sample], use_known_category: bool = False) -> list[list[Score]]:
        """Scores per sample (one per response), routed unless ``use_known_category``."""
        ctx = [s.context for s in samples for _ in s.responses]
        resp = [r for s in samples for r in s.responses]
        cats = [s.category for s in samples for _ in s.responses] if use_known_category else None
        return _per_sample(samples, self.score(ctx, resp, cats))


class SingleRewardModel:
    """The single-RM baseline: the same backbone and top, one value head, no router, no experts."""

    def __init__(self, backbone: Backbone, top: TopStack, batch_size: int = 32) -> None:
        self.backbone, self.top, self.batch_size = backbone, top.eval(), batch_size

    @torch.no_grad()
    def score(self, contexts: Sequence[Sequence[Turn]], responses: Sequence[str]) -> list[float]:
        out = [0.0] * len(responses)
        for batch in _length_batches(_approx_lengths(contexts, responses), self.batch_size):
            enc = self.backbone.encode([list(contexts[i]) for i in batch], [responses[i] for i in batch])
            args, kwargs = self.backbone.layer_inputs(enc.attention_mask)
            _, scores = self.top(self.backbone.trunk(enc), enc.attention_mask, args, kwargs)
            for i, s in zip(batch, scores.tolist()):
                out[i] = s
        return out

    def score_samples(self, samples: Sequence[Sample]) -> list[list[float]]:
        return _per_sample(samples, self.score([s.context for s in samples for _ in s.responses],
                                               [r for s in samples for r in s.responses]))
