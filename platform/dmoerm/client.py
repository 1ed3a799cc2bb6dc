"""A small client of the reward server: sync and async calls with timeouts and retries, and a TRL reward
function backed by the endpoint.

    from dmoerm.client import RewardClient, trl_reward_function
    rc = RewardClient("http://127.0.0.1:8000")             # token from $DMOERM_SERVE_TOKEN, if set
    rc.reward([{"role": "user", "content": "hi"}], ["hello!", "go away"])["rewards"]
    trainer = GRPOTrainer(..., reward_funcs=[trl_reward_function("http://127.0.0.1:8000")])

Retries cover connection errors, timeouts, 429 and 502/503/504 (exponential backoff, ``Retry-After`` honoured);
any other error status raises :class:`RewardAPIError` with the server's message and the field it named.
Batches are split by the server's item limit (read once from ``GET /v1/models``).
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx

RETRY_STATUS = frozenset({429, 502, 503, 504})
Messages = list[dict[str, str]]


class RewardAPIError(RuntimeError):
    """The server refused a request (a 4xx, or a 5xx after the retries)."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(f"{status}: {message}")
        self.status, self.message, self.field = status, message, field


def _item(conversation: str | Messages, responses: Sequence[str], category: str | None) -> dict:
    item: dict[str, Any] = ({"prompt": conversation} if isinstance(conversation, str)
                            else {"messages": list(conversation)})
    item["responses"] = list(responses)
    if category is not None:
        item["category"] = category
    return item


def _error(r: httpx.Response) -> RewardAPIError:
    try:
        err = r.json()["error"]
        return RewardAPIError(r.status_code, str(err.get("message")), err.get("param"))
    except Exception:
        return RewardAPIError(r.status_code, r.text[:500])


def _delay(attempt: int, backoff_s: float, response: httpx.Response | None) -> float:
    if response is not None:
        after = response.headers.get("retry-after", "")
        if after.replace(".", "", 1).isdigit():
            return min(float(after), 30.0)
    return backoff_s * 2 ** attempt * (0.5 + random.random())


class _Base:
    def __init__(self, url: str, token: str | None = None, *, timeout_s: float = 30.0, max_retries: int = 3,
                 backoff_s: float = 0.2, max_items: int | None = None, token_env: str = "DMOERM_SERVE_TOKEN") -> None:
        self.url = url.rstrip("/")
        token = token if token is not None else os.environ.get(token_env) or None
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.timeout_s, self.max_retries, self.backoff_s, self.max_items = timeout_s, max_retries, backoff_s, max_items

    def _chunks(self, items: list[dict], max_items: int) -> list[list[dict]]:
        return [items[i: i + max_items] for i in range(0, len(items), max_items)]

    @staticmethod
    def _limit_from(models: dict) -> int:
        return int(models["data"][0].get("limits", {}).get("max_items", 256))


class RewardClient(_Base):
    """Blocking client; one connection pool, reusable across threads."""

    def __init__(self, url: str, token: str | None = None, **kwargs: Any) -> None:
        super().__init__(url, token, **kwargs)
        self._http = httpx.Client(base_url=self.url, headers=self.headers, timeout=self.timeout_s)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        for attempt in range(self.max_retries + 1):
            response = None
            try:
                response = self._http.request(method, path, json=body)
                if response.status_code < 400:
                    return response.json()
                if response.status_code not in RETRY_STATUS or attempt == self.max_retries:
                    raise _error(response)
            except (httpx.TransportError, httpx.TimeoutException):
                if attempt == self.max_retries:
                    raise
            time.sleep(_delay(attempt, self.backoff_s, response))
        raise AssertionError("unreachable")

    def reward(self, conversation: str | Messages, responses: Sequence[str], category: str | None = None) -> dict:
        """One conversation (a prompt string or chat messages) -> rewards, category, capability scores."""
        return self._request("POST", "/v1/reward", _item(conversation, responses, category))

    def rewards(self, items: Sequence[tuple[str | Messages, Sequence[str]]]) -> list[dict]:
        """Many conversations, sent in as few requests as the server's item limit allows."""
        if self.max_items is None:  # the server's own limit, asked once
            self.max_items = self._limit_from(self.models())
        out: list[dict] = []
        for chunk in self._chunks([_item(c, r, None) for c, r in items], self.max_items):
            out.extend(self._request("POST", "/v1/reward", {"inputs": chunk})["results"])
        return out

    def get_reward(self, queries: Sequence[str], prompts: Sequence[str] | None = None) -> dict:
        body: dict[str, Any] = {"query": list(queries)}
        if prompts is not None:
            body["prompts"] = list(prompts)
        return self._request("POST", "/get_reward", body)

    def models(self) -> dict:
        return self._request("GET", "/v1/models")

    def health(self) -> dict:
        return self._request("GET", "/healthz")


class AsyncRewardClient(_Base):
    """The same calls for asyncio code (one ``httpx.AsyncClient``)."""

    def __init__(self, url: str, token: str | None = None, *, max_connections: int = 64, **kwargs: Any) -> None:
        super().__init__(url, token, **kwargs)
        self._http = httpx.AsyncClient(base_url=self.url, headers=self.headers, timeout=self.timeout_s,
                                       limits=httpx.Limits(max_connections=max_connections))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncRewardClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        for attempt in range(self.max_retries + 1):
            response = None
            try:
                response = await self._http.request(method, path, json=body)
                if response.status_code < 400:
                    return response.json()
                if response.status_code not in RETRY_STATUS or attempt == self.max_retries:
                    raise _error(response)
            except (httpx.TransportError, httpx.TimeoutException):
                if attempt == self.max_retries:
                    raise
            await asyncio.sleep(_delay(attempt, self.backoff_s, response))
        raise AssertionError("unreachable")

    async def reward(self, conversation: str | Messages, responses: Sequence[str],
                     category: str | None = None) -> dict:
        return await self._request("POST", "/v1/reward", _item(conversation, responses, category))

    async def rewards(self, items: Sequence[tuple[str | Messages, Sequence[str]]]) -> list[dict]:
        if self.max_items is None:
            self.max_items = self._limit_from(await self.models())
        chunks = self._chunks([_item(c, r, None) for c, r in items], self.max_items)
        answers = await asyncio.gather(*(self._request("POST", "/v1/reward", {"inputs": c}) for c in chunks))
        return [res for a in answers for res in a["results"]]

    async def get_reward(self, queries: Sequence[str], prompts: Sequence[str] | None = None) -> dict:
        body: dict[str, Any] = {"query": list(queries)}
        if prompts is not None:
            body["prompts"] = list(prompts)
        return await self._request("POST", "/get_reward", body)

    async def models(self) -> dict:
        return await self._request("GET", "/v1/models")


def _completion_text(completion: str | Messages) -> str:
    """TRL passes a string, or for conversational data a list of messages (the generated assistant turn)."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content", "") for m in completion if m.get("role", "assistant") == "assistant")


def _trl_items(prompts: Sequence[str | Messages], completions: Sequence[str | Messages]) -> list[tuple]:
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
    return [(p if isinstance(p, str) else list(p), [_completion_text(c)]) for p, c in zip(prompts, completions)]


def trl_reward_function(url: str, token: str | None = None, *, asynchronous: bool = False,
                        **client_kwargs: Any) -> Callable[..., Any]:
    """A TRL (GRPO/RLOO) reward function scoring each completion with the served DMoERM.

    TRL calls it once per local batch as ``f(prompts=..., completions=..., **dataset_columns)``; the whole
    batch goes in one request (several only past the server's item limit). ``asynchronous=True`` returns
    an ``async def`` (TRL runs async reward functions concurrently with the others).
    """
    if asynchronous:
        client = AsyncRewardClient(url, token, **client_kwargs)

        async def dmoerm_reward_async(prompts, completions, **_columns) -> list[float]:
            results = await client.rewards(_trl_items(prompts, completions))
            return [r["rewards"][0] for r in results]

        return dmoerm_reward_async
    sync_client = RewardClient(url, token, **client_kwargs)

    def dmoerm_reward(prompts, completions, **_columns) -> list[float]:
        return [r["rewards"][0] for r in sync_client.rewards(_trl_items(prompts, completions))]

    return dmoerm_reward
