"""The composed DMoERM: route each conversation, then score it with its category's inner MoE.

Scoring is batched end to end: rows are tokenized once, sorted by token length and cut into batches
(at most ``batch_size`` rows and, optionally, ``max_batch_tokens`` padded tokens), the shared trunk runs
once per row, and within a batch each category present runs all its K experts in ONE mixed-adapter
forward (one adapter per row) followed by its aggregator. Routing runs once per distinct context: from a
context pass before the batches, or, for a decoder routed from row prefixes, inside the batch's own
trunk pass.

Everything runs on the backbone's device (``dmoerm.device``): the router, the experts and the aggregators
are moved there when the model is built, each batch is padded there, and the blocks compute in the
backbone's precision; what comes back (scores, probabilities) is host data.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from dmoerm.data.records import Sample, Turn
from dmoerm.modeling.aggregator import Aggregator
from dmoerm.modeling.backbone import Backbone, Encoded, TokenRow, length_batches
from dmoerm.modeling.router import RouterHead, context_features, prefix_mean
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
    tokens: int = 0
    """Tokens of the scored row (special tokens included), after truncation."""
    context_tokens_dropped: int = 0
    """Context tokens cut from the context's start to fit ``max_length``."""
    response_tokens_dropped: int = 0
    """Response tokens cut from the response's end to fit ``max_length``."""
    response_tokens: int = 0
    """Response tokens kept (the model saw ``response_tokens`` of ``response_tokens +
    response_tokens_dropped``)."""
    input_digest: str = ""
    """Digest of the row's kept token ids: two rows with the same digest are the same model input (e.g.
    two responses that differ only past the truncation point). Empty when unknown."""


def _per_sample(samples: Sequence[Sample], flat: list) -> list[list]:
    """Regroup one flat list (a value per response, samples in order) into one list per sample."""
    out, k = [], 0
    for s in samples:
        out.append(flat[k: k + len(s.responses)])
        k += len(s.responses)
    return out


def _digest(ids: Sequence[int]) -> str:
    """A short digest of a row's token ids (equal ids, equal digest)."""
    return hashlib.blake2b(",".join(map(str, ids)).encode(), digest_size=12).hexdigest()


TrunkHook = Callable[[list[int], Encoded, torch.Tensor], None]
"""Called once per scoring batch with the batch's row indices, its padded rows and its (B, T, H) trunk
states, so another head on the same frozen trunk (the baseline) reuses the pass."""


def _context_key(context: Sequence[Turn]) -> str:
    return repr([(t.role, t.content) for t in context])


def _token_batches(backbone: Backbone, contexts: Sequence[Sequence[Turn]], responses: Sequence[str],
                   batch_size: int, max_batch_tokens: int | None) -> tuple[list[TokenRow], list[list[int]]]:
    """Rows tokenized once and their length-sorted batches (indices into the rows)."""
    rows = backbone.tokenize(contexts, responses)
    return rows, length_batches([len(r.ids) for r in rows], batch_size, max_batch_tokens)


class RewardModel:
    """DMoERM: ``router`` picks a category per context; that category's experts and aggregator score.

    ``max_batch_tokens`` caps a batch's padded tokens (rows x longest row) on top of ``batch_size``. The
    router and the categories' modules are moved to the backbone's device."""

    def __init__(self, backbone: Backbone, router: RouterHead, categories: dict[str, CategoryModel],
                 batch_size: int = 32, max_batch_tokens: int | None = None) -> None:
        if list(categories) != router.categories:
            raise ValueError(f"router categories {router.categories} != inner models {list(categories)}")
        self.backbone, self.router, self.categories = backbone, router.eval().to(backbone.device), categories
        self.batch_size, self.max_batch_tokens = batch_size, max_batch_tokens
        self.router_inputs = router.inputs.resolve(backbone)  # (raises on settings this backbone cannot use)
        for cat in categories.values():
            cat.experts.eval().to(backbone.device)
            cat.aggregator.eval().to(backbone.device)

    def _classify(self, feats: torch.Tensor) -> tuple[list[str], list[float], torch.Tensor]:
        probs = self.router(feats).softmax(-1)  # (N, C)
        best = probs.argmax(-1)
        names = [self.router.categories[i] for i in best.tolist()]
        return names, probs.gather(1, best[:, None]).squeeze(1).tolist(), probs

    @torch.no_grad()
    def route(self, contexts: Sequence[Sequence[Turn]]) -> tuple[list[str], list[float], torch.Tensor]:
        """Category name, its probability and the full (N, C) probabilities per context (one context
        pass per distinct context)."""
        keys = [_context_key(c) for c in contexts]
        distinct = dict(zip(keys, contexts))
        position = {k: j for j, k in enumerate(distinct)}
        index = [position[k] for k in keys]
        feats = context_features(self.backbone, list(distinct.values()), self.router_inputs,
                                 batch_size=self.batch_size, max_batch_tokens=self.max_batch_tokens)  # (U, H)
        names, probs, full = self._classify(feats.to(self.backbone.device))
        return [names[i] for i in index], [probs[i] for i in index], full[index].cpu()

    @torch.no_grad()
    def score(self, contexts: Sequence[Sequence[Turn]], responses: Sequence[str],
              categories: Sequence[str | None] | None = None) -> list[Score]:
        """One ``Score`` per (context, response) row. ``categories`` forces a category per row."""
        return self._score(contexts, responses, categories)

    def _score(self, contexts: Sequence[Sequence[Turn]], responses: Sequence[str],
               categories: Sequence[str | None] | None, on_trunk: TrunkHook | None = None) -> list[Score]:
        if len(contexts) != len(responses):
            raise ValueError(f"{len(contexts)} contexts for {len(responses)} responses")
        if not responses:
            return []
        forced = list(categories) if categories is not None else [None] * len(contexts)
        for c in forced:
            if c is not None and c not in self.categories:
                raise ValueError(f"unknown category {c!r}; this model has {list(self.categories)}")
        if len(self.categories) == 1:
            forced = [next(iter(self.categories))] * len(contexts)
        keys = [_context_key(c) for c in contexts]
        todo = [i for i, c in enumerate(forced) if c is None]
        rows, batches = _token_batches(self.backbone, contexts, responses, self.batch_size, self.max_batch_tokens)
        sources = self._prefix_sources(keys, rows, batches, todo)
        separate = {keys[i]: contexts[i] for i in todo if keys[i] not in sources}
        routes: dict[str, tuple[str, float]] = {}  # context key -> (category, probability)
        if separate:  # contexts no row prefix routes: one context pass each, before the batches
            names, probs, _ = self.route(list(separate.values()))
            routes.update(zip(separate, zip(names, probs)))
        out: list[Score | None] = [None] * len(responses)
        _, mid, tail = self.backbone.special_ids()
        for batch in batches:
            enc = self.backbone.pad([rows[i] for i in batch])
            hidden = self._trunk_and_route(enc, [keys[i] if sources.get(keys[i]) == i else None for i in batch],
                                           routes)  # (B, T, H)
            if on_trunk is not None:
                on_trunk(batch, enc, hidden)
            route = {i: (forced[i], 1.0) if forced[i] is not None else routes[keys[i]] for i in batch}
            for cat_name in sorted({route[i][0] for i in batch}):
                local = [j for j, i in enumerate(batch) if route[i][0] == cat_name]
                cat = self.categories[cat_name]
                ex = run_experts(cat.experts, cat.capabilities, self.backbone, hidden[local],
                                 enc.attention_mask[local])
                rewards = cat.aggregator(ex.pooled)  # (b,)
                for j, r, s in zip(local, rewards.tolist(), ex.scores.tolist()):
                    i, row = batch[j], rows[batch[j]]
                    out[i] = Score(r, cat_name, route[i][1], dict(zip(cat.capabilities, s)), len(row.ids),
                                   row.context_dropped, row.response_dropped,
                                   len(row.ids) - row.context_end - len(mid) - len(tail), _digest(row.ids))
        return out  # type: ignore[return-value]

    def _prefix_sources(self, keys: list[str], rows: list[TokenRow], batches: list[list[int]],
                        todo: list[int]) -> dict[str, int]:
        """Context key -> the row whose trunk prefix routes it: a row of the batch where the context first
        appears that holds the whole routed context (nothing cut, at most ``max_context_tokens``)."""
        if self.router_inputs.source != "prefix":
            return {}
        limit = self.router_inputs.max_context_tokens
        head = len(self.backbone.special_ids()[0])  # tokens before the context
        need = set(todo)
        first_batch: dict[str, int] = {}
        sources: dict[str, int] = {}
        for b, batch in enumerate(batches):
            for i in (i for i in batch if i in need):
                whole = rows[i].context_dropped == 0 and (limit is None or rows[i].context_end - head <= limit)
                if first_batch.setdefault(keys[i], b) == b and whole:
                    sources.setdefault(keys[i], i)
        return sources

    def _trunk_and_route(self, enc: Encoded, source_keys: list[str | None],
                         routes: dict[str, tuple[str, float]]) -> torch.Tensor:
        """The batch's (B, T, H) trunk states. Rows with a key in ``source_keys`` route their context from
        the same pass (states entering the router's block, mean over the context positions)."""
        mine = [j for j, k in enumerate(source_keys) if k is not None]
        if not mine:
            return self.backbone.trunk(enc)
        hidden, states = self.backbone.block_inputs(enc, [self.backbone.split,
                                                          self.router_inputs.depth(self.backbone)])
        names, probs, _ = self._classify(prefix_mean(states[mine], enc.context_ends[mine]))  # (b, H) features
        routes.update((source_keys[j], (n, p)) for j, n, p in zip(mine, names, probs))
        return hidden

    def score_samples(self, samples: Sequence[Sample], use_known_category: bool = False) -> list[list[Score]]:
        """Scores per sample (one per response), routed unless ``use_known_category``."""
        ctx = [s.context for s in samples for _ in s.responses]
        resp = [r for s in samples for r in s.responses]
        cats = [s.category for s in samples for _ in s.responses] if use_known_category else None
        return _per_sample(samples, self.score(ctx, resp, cats))


class SingleRewardModel:
    """The single-RM baseline: the same backbone and top, one value head, no router, no experts."""

    def __init__(self, backbone: Backbone, top: TopStack, batch_size: int = 32,
                 max_batch_tokens: int | None = None) -> None:
        self.backbone, self.top, self.batch_size = backbone, top.eval().to(backbone.device), batch_size
        self.max_batch_tokens = max_batch_tokens

    @torch.no_grad()
    def score(self, contexts: Sequence[Sequence[Turn]], responses: Sequence[str]) -> list[float]:
        out = [0.0] * len(responses)
        rows, batches = _token_batches(self.backbone, contexts, responses, self.batch_size, self.max_batch_tokens)
        for batch in batches:
            enc = self.backbone.pad([rows[i] for i in batch])
            for i, s in zip(batch, self.score_trunk(enc, self.backbone.trunk(enc))):
                out[i] = s
        return out

    @torch.no_grad()
    def score_trunk(self, enc: Encoded, hidden: torch.Tensor) -> list[float]:
        """Rewards of a padded batch from its (B, T, H) trunk states (computed once, maybe by another model)."""
        args, kwargs = self.backbone.layer_inputs(enc.attention_mask)
        _, scores = self.top(hidden, enc.attention_mask, args, kwargs)  # (B,)
        return scores.tolist()

    def score_samples(self, samples: Sequence[Sample]) -> list[list[float]]:
        return _per_sample(samples, self.score([s.context for s in samples for _ in s.responses],
                                               [r for s in samples for r in s.responses]))


@torch.no_grad()
def score_with_baseline(model: RewardModel, baseline: SingleRewardModel, samples: Sequence[Sample],
                        use_known_category: bool = False) -> tuple[list[list[Score]], list[list[float]]]:
    """Both models' scores per sample (one per response) from ONE trunk pass per row: the baseline's top
    reads the trunk states of the DMoERM's own batches (its batching, its routing). The two must share the
    frozen backbone (a bundle's do); otherwise each runs its own trunk."""
    if baseline.backbone is not model.backbone:
        return model.score_samples(samples, use_known_category), baseline.score_samples(samples)
    ctx = [s.context for s in samples for _ in s.responses]
    resp = [r for s in samples for r in s.responses]
    cats = [s.category for s in samples for _ in s.responses] if use_known_category else None
    base = [0.0] * len(resp)

    def also_baseline(batch: list[int], enc: Encoded, hidden: torch.Tensor) -> None:
        for i, r in zip(batch, baseline.score_trunk(enc, hidden)):
            base[i] = r

    scores = model._score(ctx, resp, cats, on_trunk=also_baseline)
    return _per_sample(samples, scores), _per_sample(samples, base)
