"""The reward server's HTTP contract as pydantic models: requests, responses and errors.

Three ways in, one scorer behind them:

- ``POST /v1/reward``: a conversation (``messages`` or ``prompt``) and one or more ``responses`` -> one
  reward per response, the routed category with its probability and per-capability expert scores; a batch
  of such items under ``inputs``.
- ``POST /get_reward``: OpenRLHF's remote reward model (``{"query": [...], "prompts": [...], "labels": [...]}``
  -> ``{"rewards", "scores", "extra_logs"}``); ``query`` is prompt + response with chat-template tokens.
- ``POST /classify``: vLLM's classification shape that verl's reward loop calls.

Every model is strict (no silent type coercion) and forbids unknown fields, except where a client is known
to send extra ones (OpenRLHF, vLLM). Bodies are parsed by :func:`parse_body`, so a bad request is a
:class:`RequestError` (status, message, field) and never an exception from deep inside the scorer.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class RequestError(Exception):
    """A client error: HTTP ``status``, a message naming what was wrong, and the field (JSON path)."""

    def __init__(self, status: int, message: str, field: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.field, self.kind = status, message, field, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.field, "code": self.status}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class _Lenient(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str


class RewardItem(_Strict):
    """One conversation and the responses to score."""

    messages: list[Message] | None = Field(None, description="Conversation turns before the response(s).")
    prompt: str | None = Field(None, description="Shorthand for one user turn (instead of messages).")
    responses: list[str] | None = Field(None, description="Candidate responses, one reward each.")
    response: str | None = Field(None, description="Shorthand for one response (instead of responses).")
    category: str | None = Field(None, description="Force this task category instead of routing.")

    @model_validator(mode="after")
    def _one_of_each(self) -> RewardItem:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of 'messages' or 'prompt'")
        if (self.responses is None) == (self.response is None):
            raise ValueError("give exactly one of 'responses' or 'response'")
        if self.messages is not None and not self.messages:
            raise ValueError("'messages' must hold at least one turn")
        if self.responses is not None and not self.responses:
            raise ValueError("'responses' must hold at least one response")
        return self

    def response_list(self) -> list[str]:
        return self.responses if self.responses is not None else [self.response or ""]


class RewardRequest(RewardItem):
    """A single item inline, or several under ``inputs`` (one request for a whole local batch)."""

    model: str | None = Field(None, description="Optional: must name the served model if given.")
    inputs: list[RewardItem] | None = Field(None, description="Batch form: several items.")

    @model_validator(mode="before")
    @classmethod
    def _batch_or_single(cls, data: Any) -> Any:
        if isinstance(data, dict) and "inputs" in data:
            inline = sorted(set(data) & {"messages", "prompt", "responses", "response", "category"})
            if inline:
                raise ValueError(f"give either 'inputs' or an inline item, not both (found {inline})")
        return data

    @model_validator(mode="after")
    def _one_of_each(self) -> RewardRequest:
        if self.inputs is not None:
            if not self.inputs:
                raise ValueError("'inputs' must hold at least one item")
            return self
        return RewardItem._one_of_each(self)  # type: ignore[return-value]

    def items(self) -> list[RewardItem]:
        return self.inputs if self.inputs is not None else [self]


class Truncation(BaseModel):
    tokens: int = Field(description="Tokens of the scored row after truncation.")
    context_tokens_dropped: int = Field(description="Tokens cut from the start of the conversation.")
    response_tokens_dropped: int = Field(description="Tokens cut from the end of the response.")


class RewardResult(BaseModel):
    category: str
    category_prob: float
    category_source: Literal["router", "override", "single"]
    rewards: list[float]
    capability_scores: list[dict[str, float]]
    truncated: bool = Field(description="Whether any response's row was cut to the model's max length.")
    truncation: list[Truncation]


class RewardResponse(RewardResult):
    model: str
    version: str


class BatchRewardResponse(BaseModel):
    model: str
    version: str
    results: list[RewardResult]


# ---- OpenRLHF ------------------------------------------------------------------------------------------
class GetRewardRequest(_Lenient):
    """OpenRLHF's remote reward model request; only ``query`` is required."""

    query: list[str] | str
    prompts: list[str] | str | None = None
    labels: list[Any] | Any | None = None

    @model_validator(mode="after")
    def _lists(self) -> GetRewardRequest:
        if isinstance(self.query, str):
            self.query = [self.query]
        if isinstance(self.prompts, str):
            self.prompts = [self.prompts]
        if not self.query:
            raise ValueError("'query' must hold at least one text")
        if self.prompts is not None and len(self.prompts) != len(self.query):
            raise ValueError(f"'prompts' has {len(self.prompts)} texts for {len(self.query)} queries")
        return self


class GetRewardResponse(BaseModel):
    rewards: list[float]
    scores: list[float]
    extra_logs: dict[str, list[float]]


# ---- vLLM /classify (verl) -----------------------------------------------------------------------------
REMOVED_CLASSIFY_FIELDS = ("activation", "softmax", "normalize")


class ClassifyRequest(_Lenient):
    model: str | None = None
    input: list[str] | str | None = None
    messages: list[Message] | None = None
    use_activation: bool | None = Field(None, description="true/null: sigmoid(reward); false: the raw reward.")
    add_special_tokens: bool = True
    truncate_prompt_tokens: int | None = None
    priority: int = 0
    request_id: str | None = None
    user: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _removed(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name in REMOVED_CLASSIFY_FIELDS:
                if name in data:
                    raise ValueError(f"'{name}' was removed from the classify API; use 'use_activation'")
        return data

    @model_validator(mode="after")
    def _one_input(self) -> ClassifyRequest:
        if (self.input is None) == (self.messages is None):
            raise ValueError("give exactly one of 'input' or 'messages'")
        if isinstance(self.input, list) and not self.input:
            raise ValueError("'input' must hold at least one text")
        if self.messages is not None and (not self.messages or self.messages[-1].role != "assistant"):
            raise ValueError("'messages' must end with the assistant response to score")
        return self


class ClassifyData(BaseModel):
    index: int
    label: str
    probs: list[float]
    num_classes: int = 1


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int = 0
    prompt_tokens_details: dict | None = None


class ClassifyResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ClassifyData]
    usage: Usage


# ---- parsing -------------------------------------------------------------------------------------------
def parse_body(raw: bytes, model: type[BaseModel], max_bytes: int) -> Any:
    """Bytes of a request body -> a validated ``model``, or a :class:`RequestError` naming the problem."""
    if len(raw) > max_bytes:
        raise RequestError(413, f"request body is {len(raw)} bytes; the limit is {max_bytes}", None,
                           "request_too_large")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(400, f"request body is not valid UTF-8 (byte {e.start})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise RequestError(400, f"request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
                           ) from None
    if not isinstance(obj, dict):
        raise RequestError(422, f"request body must be a JSON object, got {type(obj).__name__}")
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        field, message = describe(e)
        raise RequestError(422, message, field) from None


def field_path(loc: tuple) -> str:
    """``("inputs", 0, "responses", 2)`` -> ``inputs[0].responses[2]``; pydantic's union tags are skipped."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and (part.startswith(("list[", "function-")) or part in ("str", "bool", "int")):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


def describe(error: ValidationError) -> tuple[str | None, str]:
    """The first error of a pydantic ValidationError as (field path, a sentence naming the field)."""
    first = error.errors(include_url=False)[0]
    field = field_path(tuple(first.get("loc", ()))) or None
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if field is None and msg.startswith("'") and "'" in msg[1:]:  # a model-level check that names its field
        field = msg[1: msg.index("'", 1)]
        return field, msg
    more = len(error.errors()) - 1
    suffix = f" (and {more} more error{'s' if more > 1 else ''})" if more else ""
    return field, (f"{field}: {msg}" if field else msg) + suffix


def schemas() -> dict[str, type[BaseModel]]:
    """Request and response models by name, for the OpenAPI document."""
    return {m.__name__: m for m in (RewardRequest, RewardResponse, BatchRewardResponse, GetRewardRequest,
                                    GetRewardResponse, ClassifyRequest, ClassifyResponse)}
