"""The reward server's logic, Ray-free: requests -> rows to score -> response bodies, and the served model.

``serve/app.py`` is a thin Ray Serve layer over this: its ingress parses and validates with these functions,
its router and adapter-pool deployments each hold a :class:`ServedModel`, and its batches call
:meth:`ServedModel.score_rows`. Tests drive the same functions in process.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass, field

from dmoerm.data.records import Turn
from dmoerm.modeling.reward_model import Score
from dmoerm.serving.api import (
    ClassifyData,
    ClassifyRequest,
    ClassifyResponse,
    GetRewardRequest,
    GetRewardResponse,
    RequestError,
    RewardItem,
    RewardRequest,
    RewardResult,
    Truncation,
    Usage,
)

logger = logging.getLogger(__name__)


@dataclass
class ServeLimits:
    """What one request may ask for; beyond it the server answers 413/422 naming the field."""

    max_body_bytes: int = 4 << 20
    """Request body size."""
    max_items: int = 256
    """Conversations per request (``inputs`` of /v1/reward, ``query`` of /get_reward, ``input`` of /classify)."""
    max_responses: int = 64
    """Responses per conversation in /v1/reward."""
    max_text_chars: int = 200_000
    """Characters of one message, response or query. Longer texts are refused; texts that fit are still
    truncated to the model's ``max_length`` tokens (the start of the conversation is cut first, then the end
    of the response) and the response reports it."""

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_items", "max_responses", "max_text_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"limits.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class Row:
    """One (conversation, response) to score; ``category`` forces the inner model (else routed)."""

    context: list[Turn]
    response: str
    category: str | None = None


@dataclass
class Conversation:
    """One conversation of a request with its responses, and where its category comes from."""

    context: list[Turn]
    responses: list[str]
    category: str | None = None  # a user override
    routed: tuple[str, float] | None = None  # filled by the router
    field_name: str = ""

    def rows(self) -> list[Row]:
        cat = self.category or (self.routed[0] if self.routed else None)
        return [Row(self.context, r, cat) for r in self.responses]


# ---- the model ------------------------------------------------------------------------------------------
@dataclass
class ServedModel:
    """A loaded bundle with its registry identity. Forward passes are serialised by a lock, shared by every
    model on the same base (its category subsets): one replica runs one batch at a time on its threads (the
    backbone's split is a forward hook, not safe to run twice at once), and a stuck forward makes the
    health probe wait (and fail)."""

    name: str
    version: str
    uri: str
    bundle: object  # dmoerm.bundle.LoadedBundle
    path: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def load(cls, uri: str, tracking_uri: str | None = None, version: str | None = None, base: str | None = None,
             batch_size: int = 32, resident: int | None = None, device: str = "auto") -> ServedModel:
        """Resolve and load ``uri``; ``resident`` loads only the first that many categories' experts (None: all).
        ``device``: where it scores (``auto``: the replica's GPU when it has one, else cpu), in the precision
        the bundle was trained in; the categories added by ``with_category`` share its base there."""
        from dmoerm.bundle import load_bundle, read_meta
        from dmoerm.serving.source import resolve_model

        ref = resolve_model(uri, tracking_uri, version)
        categories = None
        if resident is not None:
            categories = [c["name"] for c in read_meta(ref.path)["taxonomy"]][:resident]
        loaded = load_bundle(ref.path, base=base, batch_size=batch_size, categories=categories, device=device)
        return cls(ref.name, ref.version, uri, loaded, ref.path)

    def with_category(self, category: str) -> ServedModel:
        """The same version with ``category``'s experts on this model's base (loaded once, shared)."""
        from dmoerm.bundle import load_bundle

        if category not in self.categories:
            raise ValueError(f"unknown category {category!r}; this model has {sorted(self.categories)}")
        model = self.model
        with self.lock:  # no forward runs on the shared base meanwhile (its split hooks must not be copied)
            loaded = load_bundle(self.path, backbone=model.backbone, batch_size=model.batch_size,
                                 categories=[category], check_fingerprint=False)
        return ServedModel(self.name, self.version, self.uri, loaded, self.path, self.lock)

    @property
    def model(self):
        return self.bundle.model  # type: ignore[attr-defined]

    @property
    def categories(self) -> dict[str, list[str]]:
        """Every category of the bundle (loaded here or not) and its capabilities."""
        return {c["name"]: list(c["capabilities"]) for c in self.bundle.meta["taxonomy"]}  # type: ignore[attr-defined]

    @property
    def loaded_categories(self) -> list[str]:
        return list(self.model.categories)

    @property
    def max_length(self) -> int:
        return int(self.model.backbone.max_length)

    def route(self, contexts: list[list[Turn]]) -> list[tuple[str, float]]:
        """(category, probability) per context; one category needs no routing."""
        if len(self.categories) == 1:
            return [(next(iter(self.categories)), 1.0)] * len(contexts)
        with self.lock:
            names, probs, _ = self.model.route(contexts)
        return list(zip(names, probs))

    def score_rows(self, rows: list[Row]) -> list[Score]:
        """All rows in one call of the batched scorer (rows without a category are routed there)."""
        if not rows:
            return []
        with self.lock:
            scores = self.model.score([r.context for r in rows], [r.response for r in rows],
                                      [r.category for r in rows])
        return list(scores)

    def probe(self) -> float:
        """A real forward pass on a fixed row (the health check): its reward, which must be finite."""
        complete = len(self.loaded_categories) == len(self.categories)  # then the router runs too
        row = Row([Turn("user", "health check")], "ok", None if complete else self.loaded_categories[0])
        reward = self.score_rows([row])[0].reward
        if not math.isfinite(reward):
            raise RuntimeError(f"health probe of {self.name} v{self.version} gave a non-finite reward {reward}")
        return reward

    def info(self) -> dict:
        meta = self.bundle.meta  # type: ignore[attr-defined]
        return {"id": self.name, "object": "model", "version": self.version, "uri": self.uri,
                "categories": self.categories, "max_length": self.max_length,
                "base": meta["base"]["reference"], "created": meta.get("created")}


# ---- requests -> conversations ------------------------------------------------------------------------
def _check_text(text: str, where: str, limits: ServeLimits) -> None:
    if len(text) > limits.max_text_chars:
        raise RequestError(413, f"{where}: {len(text)} characters; the limit is {limits.max_text_chars}", where,
                           "request_too_large")


def _check_model(asked: str | None, served: str) -> None:
    if asked not in (None, "", served):
        raise RequestError(404, f"model: {asked!r} is not served here (this server serves {served!r})", "model",
                           "model_not_found")


def _check_items(n: int, where: str, limits: ServeLimits) -> None:
    if n > limits.max_items:
        raise RequestError(413, f"{where}: {n} items; the limit is {limits.max_items} per request", where,
                           "request_too_large")


def conversations_from_reward(req: RewardRequest, served: ServedModel, limits: ServeLimits) -> list[Conversation]:
    _check_model(req.model, served.name)
    items: list[RewardItem] = req.items()
    prefix = "inputs" if req.inputs is not None else ""
    _check_items(len(items), prefix or "request", limits)
    out = []
    for i, item in enumerate(items):
        at = f"{prefix}[{i}]." if prefix else ""
        if item.messages is not None:
            context = [Turn(m.role, m.content) for m in item.messages]
            for j, m in enumerate(item.messages):
                _check_text(m.content, f"{at}messages[{j}].content", limits)
        else:
            _check_text(item.prompt or "", f"{at}prompt", limits)
            context = [Turn("user", item.prompt or "")]
        responses = item.response_list()
        name = "responses" if item.responses is not None else "response"
        if len(responses) > limits.max_responses:
            raise RequestError(413, f"{at}{name}: {len(responses)} responses; the limit is {limits.max_responses}",
                               f"{at}{name}", "request_too_large")
        for j, r in enumerate(responses):
            _check_text(r, f"{at}responses[{j}]" if item.responses is not None else f"{at}response", limits)
        if item.category is not None and item.category not in served.categories:
            raise RequestError(422, f"{at}category: unknown category {item.category!r}; this model has "
                                    f"{sorted(served.categories)}", f"{at}category")
        out.append(Conversation(context, responses, item.category, field_name=at.rstrip(".")))
    return out


def _split(text: str, prompt: str | None, template: str, where: str) -> tuple[list[Turn], str]:
    from dmoerm.serving.templates import split_templated

    try:
        context, response = split_templated(text, template, prompt=prompt)
    except ValueError as e:
        raise RequestError(422, f"{where}: {e}", where) from None
    return context, response


def conversations_from_get_reward(req: GetRewardRequest, template: str, limits: ServeLimits) -> list[Conversation]:
    queries = list(req.query)  # type: ignore[arg-type]
    _check_items(len(queries), "query", limits)
    prompts = req.prompts if isinstance(req.prompts, list) else [None] * len(queries)
    out = []
    for i, (q, p) in enumerate(zip(queries, prompts)):
        _check_text(q, f"query[{i}]", limits)
        context, response = _split(q, p, template, f"query[{i}]")
        out.append(Conversation(context, [response], field_name=f"query[{i}]"))
    return out


def conversations_from_classify(req: ClassifyRequest, served: ServedModel, template: str,
                                limits: ServeLimits) -> list[Conversation]:
    # ``model`` is not checked: verl sends its reward-model tokenizer's path there, not our model's name.
    t = req.truncate_prompt_tokens
    if t is not None and t > served.max_length:
        raise RequestError(400, f"truncate_prompt_tokens: {t} exceeds this model's max length {served.max_length}",
                           "truncate_prompt_tokens")
    if t is not None and 0 < t < served.max_length:
        raise RequestError(422, f"truncate_prompt_tokens: only -1 or >= {served.max_length} (the model's max "
                                "length, with the server's truncation policy) is supported", "truncate_prompt_tokens")
    if req.messages is not None:
        for j, m in enumerate(req.messages):
            _check_text(m.content, f"messages[{j}].content", limits)
        turns = [Turn(m.role, m.content) for m in req.messages]
        return [Conversation(turns[:-1] or [Turn("user", "")], [turns[-1].content], field_name="messages")]
    texts = [req.input] if isinstance(req.input, str) else list(req.input or [])
    _check_items(len(texts), "input", limits)
    out = []
    for i, text in enumerate(texts):
        where = "input" if isinstance(req.input, str) else f"input[{i}]"
        _check_text(text, where, limits)
        context, response = _split(text, None, template, where)
        out.append(Conversation(context, [response], field_name=where))
    return out


# ---- scores -> response bodies ------------------------------------------------------------------------
def _source(conv: Conversation, served_categories: int) -> str:
    if conv.category is not None:
        return "override"
    return "single" if served_categories == 1 else "router"


def reward_result(conv: Conversation, scores: list[Score], num_categories: int) -> RewardResult:
    first = scores[0]
    trunc = [Truncation(tokens=s.tokens, context_tokens_dropped=s.context_tokens_dropped,
                        response_tokens_dropped=s.response_tokens_dropped) for s in scores]
    return RewardResult(category=first.category, category_prob=first.category_prob,
                        category_source=_source(conv, num_categories), rewards=[s.reward for s in scores],
                        capability_scores=[s.capability_scores for s in scores],
                        truncated=any(t.context_tokens_dropped or t.response_tokens_dropped for t in trunc),
                        truncation=trunc)


def get_reward_response(scores: list[Score], categories: dict[str, list[str]]) -> GetRewardResponse:
    """OpenRLHF reads ``rewards`` (and ``scores``) and averages every ``extra_logs`` list into its logs, so
    every list has one number per query: the routed category as its index (``category_index``; the names
    are in ``GET /v1/models``), its probability, and each capability's expert score (0.0 where the routed
    category has no such expert, counted in ``capability_present/<name>``)."""
    names = list(categories)
    caps = sorted({c for cs in categories.values() for c in cs})
    extra: dict[str, list[float]] = {
        "category_index": [float(names.index(s.category)) for s in scores],
        "category_prob": [s.category_prob for s in scores],
        "truncated": [float(bool(s.context_tokens_dropped or s.response_tokens_dropped)) for s in scores],
    }
    for c in caps:
        extra[f"capability/{c}"] = [s.capability_scores.get(c, 0.0) for s in scores]
        if any(c not in cs for cs in categories.values()):
            extra[f"capability_present/{c}"] = [float(c in s.capability_scores) for s in scores]
    rewards = [s.reward for s in scores]
    return GetRewardResponse(rewards=rewards, scores=list(rewards), extra_logs=extra)


def classify_response(req: ClassifyRequest, scores: list[Score], served: ServedModel) -> ClassifyResponse:
    activate = req.use_activation is not False
    data = [ClassifyData(index=i, label=s.category,
                         probs=[1.0 / (1.0 + math.exp(-s.reward)) if activate else s.reward])
            for i, s in enumerate(scores)]
    tokens = sum(s.tokens for s in scores)
    return ClassifyResponse(id=f"classify-{uuid.uuid4().hex}", created=int(time.time()), model=served.name,
                            data=data, usage=Usage(prompt_tokens=tokens, total_tokens=tokens))


def split_scores(convs: list[Conversation], flat: list[Score]) -> list[list[Score]]:
    out, k = [], 0
    for c in convs:
        out.append(flat[k: k + len(c.responses)])
        k += len(c.responses)
    return out
