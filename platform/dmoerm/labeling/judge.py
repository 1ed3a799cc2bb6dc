"""Capability labels from an LLM judge over an OpenAI-compatible chat-completions endpoint (arXiv 2403.01197).

For every pair of responses of a sample and every capability point of its category, the judge is asked
which response is better with respect to that capability, twice, with the two responses swapped; only
verdicts that agree after the swap become labels. Every answer is written to the answer cache
(:mod:`dmoerm.labeling.cache`, keyed by the question, on local or S3 storage) as soon as it is paid for, so
a re-run, a run after a crash, or a run on a resized cluster never pays for the same question twice.

Secrets: the API key is read from the environment variable ``api_key_env`` names, at call time, and never
stored or logged; credentials inside ``base_url`` (``https://user:pass@host``) are masked in every message.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import os
import random
import re
import time
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from dmoerm.data.records import Sample
from dmoerm.labeling.cache import AnswerCache, CachedAnswer, Key
from dmoerm.labeling.prompts import Verdict, build_messages, parse_verdict, question_sha256
from dmoerm.redact import redact_credentials

if TYPE_CHECKING:
    import httpx

logger = logging.getLogger(__name__)

_RETRYABLE_STATUS = frozenset({408, 409, 425, 429})


class JudgeError(RuntimeError):
    """The judge refused a question (non-retryable 4xx), answered garbage HTTP, or kept failing."""


@dataclass
class JudgeConfig:
    """How to reach the judge and how hard to push it."""

    base_url: str
    """OpenAI-compatible API root, e.g. ``https://api.openai.com/v1`` or ``http://vllm:8000/v1``."""
    model: str
    """Judge model name sent with every request; part of the cache key."""
    api_key_env: str = "OPENAI_API_KEY"
    """NAME of the environment variable holding the API key, read at call time; unset or "" = no key. A
    submitted job reads it from the cluster's own environment (set it on the nodes, e.g. from a Kubernetes
    secret); ``dmoerm submit`` never forwards it."""
    concurrency: int = 8
    """Maximum number of requests in flight at once."""
    max_retries: int = 5
    """Retries per question on 408/409/425/429, 5xx, timeouts and connection errors."""
    timeout_s: float = 60.0
    """Timeout of one HTTP request, in seconds."""
    backoff_s: float = 0.5
    """Base of the exponential backoff between retries (``backoff_s * 2**attempt``, jittered)."""
    backoff_max_s: float = 30.0
    """Cap on one wait between retries, also applied to a server's ``Retry-After``."""
    temperature: float = 0.0
    """Sampling temperature of the judge."""
    max_tokens: int = 8
    """Completion budget per answer: the judge must answer with one letter."""
    capability_descriptions: dict[str, str] = field(default_factory=dict)
    """Capability name -> one-line description shown to the judge (optional per capability)."""
    cache_path: str | None = None
    """Folder (a local path or ``s3://bucket/prefix``) of the shared answer cache, one object per answered
    question (:mod:`dmoerm.labeling.cache`). ``None``: ``<platform.storage_uri>/judge-cache`` in the
    pipeline; in memory (lost on a crash) in a bare ``label_samples`` call."""

    def __post_init__(self) -> None:
        if not isinstance(self.base_url, str) or not re.match(r"^https?://[^/\s]+", self.base_url):
            raise ValueError(f"JudgeConfig.base_url must be an http(s) URL like http://host:8000/v1, "
                             f"got {self.base_url!r}")
        self.base_url = self.base_url.rstrip("/")
        if self.base_url.endswith("/chat/completions"):
            raise ValueError("JudgeConfig.base_url is the API root (e.g. .../v1), without /chat/completions")
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError("JudgeConfig.model must name the judge model, e.g. 'gpt-4o-mini'")
        key_env = self.api_key_env
        if not isinstance(key_env, str) or (key_env and not key_env.isidentifier()):
            raise ValueError("JudgeConfig.api_key_env is the NAME of an environment variable (e.g. "
                             "'OPENAI_API_KEY'), never the key itself; got a value that is not a name")
        _check_number("concurrency", self.concurrency, int, minimum=1)
        _check_number("max_retries", self.max_retries, int, minimum=0)
        _check_number("max_tokens", self.max_tokens, int, minimum=1)
        _check_number("timeout_s", self.timeout_s, float, minimum=0.0, strict=True)
        _check_number("backoff_s", self.backoff_s, float, minimum=0.0)
        _check_number("backoff_max_s", self.backoff_max_s, float, minimum=self.backoff_s)
        _check_number("temperature", self.temperature, float, minimum=0.0)
        if not isinstance(self.capability_descriptions, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.capability_descriptions.items()):
            raise ValueError("JudgeConfig.capability_descriptions must map capability names to strings")
        if self.cache_path is not None:
            self.cache_path = str(self.cache_path)

    def __repr__(self) -> str:  # base_url may carry credentials (https://user:pass@host)
        shown = ", ".join(f"{f}={redact_credentials(repr(v)) if f == 'base_url' else repr(v)}"
                          for f, v in self.__dict__.items())
        return f"JudgeConfig({shown})"

    @property
    def public_url(self) -> str:
        """``base_url`` with any credentials masked: what messages and logs show."""
        return redact_credentials(self.base_url)


def _check_number(name: str, value: Any, kind: type, *, minimum: float, strict: bool = False) -> None:
    ok_type = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
    if not ok_type or value < minimum or (strict and value == minimum):
        op = ">" if strict else ">="
        raise ValueError(f"JudgeConfig.{name} must be {'a number' if kind is float else 'an integer'} "
                         f"{op} {minimum}, got {value!r}")


@dataclass(frozen=True)
class JudgeAnswer:
    """One answered question."""

    content: str | None
    """The judge's raw reply."""
    verdict: Verdict | None
    """The parsed letter, ``None`` for an abstention."""
    prompt_tokens: int
    """Prompt tokens reported by the judge (0 if it reports none)."""
    completion_tokens: int
    """Completion tokens reported by the judge (0 if it reports none)."""


# ----------------------------------------------------------------------------- the HTTP client


class JudgeClient:
    """Async chat-completions client with bounded concurrency and retries. Use ``async with``."""

    def __init__(self, cfg: JudgeConfig, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        from urllib.parse import unquote, urlsplit

        self.cfg = cfg
        # Credentials in the URL (https://user:pass@host) travel as basic auth, never in a URL that httpx
        # (whose INFO log names every request's URL) or an error message could show.
        parts = urlsplit(cfg.base_url)
        self._auth = None
        if parts.username is not None or parts.password is not None:
            self._auth = (unquote(parts.username or ""), unquote(parts.password or ""))
            parts = parts._replace(netloc=parts.netloc.rpartition("@")[2])
        self.url = f"{parts.geturl()}/chat/completions"
        """The endpoint, without credentials: what messages show."""
        self.num_retries = 0
        """Retries made so far by this client (all questions)."""
        self._transport = transport
        self._sem = asyncio.Semaphore(cfg.concurrency)
        self._http: httpx.AsyncClient | None = None

    async def __aenter__(self) -> JudgeClient:
        import httpx

        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(self.cfg.timeout_s), transport=self._transport, auth=self._auth,
            limits=httpx.Limits(max_connections=self.cfg.concurrency,
                                max_keepalive_connections=self.cfg.concurrency))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    def _headers(self) -> dict[str, str]:
        key = os.environ.get(self.cfg.api_key_env) if self.cfg.api_key_env else None
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.cfg.backoff_max_s)
        return min(self.cfg.backoff_max_s, self.cfg.backoff_s * 2**attempt) * random.uniform(0.5, 1.0)

    async def ask(self, messages: list[dict[str, str]]) -> JudgeAnswer:
        """Ask one question; retries transient failures, raises :class:`JudgeError` on anything else."""
        import httpx

        if self._http is None:
            raise RuntimeError("JudgeClient must be used as 'async with JudgeClient(cfg) as client'")
        body = {"model": self.cfg.model, "messages": messages, "temperature": self.cfg.temperature,
                "max_tokens": self.cfg.max_tokens}
        failure = ""
        for attempt in range(self.cfg.max_retries + 1):
            retry_after = None
            try:
                async with self._sem:
                    resp = await self._http.post(self.url, json=body, headers=self._headers())
            except httpx.TransportError as e:  # connection errors and timeouts
                failure = f"{type(e).__name__}: {e}".rstrip(": ")
            else:
                if resp.status_code == 200:
                    return self._parse(resp)
                message = _error_message(resp)
                if resp.status_code < 500 and resp.status_code not in _RETRYABLE_STATUS:
                    hint = (f" (is ${self.cfg.api_key_env} set to a valid key?)"
                            if resp.status_code in (401, 403) else "")
                    raise JudgeError(f"judge {self.url} refused the request with HTTP {resp.status_code}: "
                                     f"{message}{hint}")
                failure = f"HTTP {resp.status_code}: {message}"
                retry_after = _retry_after_s(resp.headers.get("retry-after"))
            if attempt == self.cfg.max_retries:
                break
            delay = self._delay(attempt, retry_after)
            self.num_retries += 1
            logger.debug("judge retry %d/%d in %.2fs after %s", attempt + 1, self.cfg.max_retries, delay,
                         failure)
            await asyncio.sleep(delay)
        raise JudgeError(f"judge {self.url} failed {self.cfg.max_retries + 1} times; last error: "
                         f"{redact_credentials(failure)}. "
                         f"Answers received so far are cached: re-running resumes from them.")

    def _parse(self, resp: httpx.Response) -> JudgeAnswer:
        try:
            data = resp.json()
            content = data["choices"][0]["message"].get("content")
            usage = data.get("usage") or {}
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
            raise JudgeError(f"judge {self.url} answered HTTP 200 but not a chat completion "
                             f"({type(e).__name__}): {resp.text[:300]!r}") from e
        content = content if isinstance(content, str) else None
        return JudgeAnswer(content, parse_verdict(content), int(usage.get("prompt_tokens") or 0),
                           int(usage.get("completion_tokens") or 0))


def _error_message(resp: httpx.Response) -> str:
    try:
        data = resp.json()
    except ValueError:
        return resp.text[:500] or resp.reason_phrase
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict):
            return str(err.get("message") or err.get("detail") or err)[:500]
        return str(err)[:500]
    return str(data)[:500]


def _retry_after_s(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


async def judge_pair(client: JudgeClient, sample: Sample, i: int, j: int, capability: str,
                     description: str = "") -> tuple[int, int] | None:
    """Ask about responses ``i`` and ``j`` in both orders (no cache): ``(better, worse)`` if they agree."""
    ab = build_messages(sample.context, sample.responses[i], sample.responses[j], capability, description)
    ba = build_messages(sample.context, sample.responses[j], sample.responses[i], capability, description)
    first, second = await asyncio.gather(client.ask(ab), client.ask(ba))
    return _consistent(i, j, first.verdict, second.verdict)


def _consistent(i: int, j: int, v_ab: Verdict | None, v_ba: Verdict | None) -> tuple[int, int] | None:
    if v_ab is None or v_ba is None:
        return None
    better_ab = i if v_ab == "A" else j  # order ab shows i as A
    better_ba = j if v_ba == "A" else i  # order ba shows j as A
    if better_ab != better_ba:
        return None
    return (better_ab, j if better_ab == i else i)


# ----------------------------------------------------------------------------- labeling a dataset



@dataclass
class LabelReport:
    """What one labeling run did. A comparison is one response pair under one capability."""

    questions_total: int = 0
    """Distinct questions the run needed: two orders per comparison (identical questions asked once)."""
    asked: int = 0
    """Questions answered by the judge in this run; HTTP attempts = ``asked + retries``."""
    cache_hits: int = 0
    """Questions answered from the cache (``asked + cache_hits == questions_total``)."""
    consistent: int = 0
    """Comparisons whose two answers agree after the swap: each became a label."""
    inconsistent: int = 0
    """Comparisons whose two answers disagree after the swap (position bias): dropped."""
    abstained: int = 0
    """Comparisons with at least one answer that was neither "A" nor "B": dropped."""
    retries: int = 0
    """Retried HTTP attempts (429, 5xx, timeouts, connection errors)."""
    prompt_tokens: int = 0
    """Prompt tokens of the calls made in this run (cache hits cost nothing)."""
    completion_tokens: int = 0
    """Completion tokens of the calls made in this run."""
    per_capability: dict[str, dict[str, int]] = field(default_factory=dict)
    """Capability -> ``{"consistent", "inconsistent", "abstained"}`` comparison counts."""
    workers: int = 1
    """Processes that asked (the Ray job's shards; 1 in process)."""

    def add(self, other: LabelReport) -> None:
        """Add another shard's counts to these (``workers`` included)."""
        for f in fields(self):
            if f.name == "per_capability":
                for cap, counts in other.per_capability.items():
                    mine = self.per_capability.setdefault(cap, {})
                    for k, v in counts.items():
                        mine[k] = mine.get(k, 0) + v
            else:
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


def _validate(samples: list[Sample], capabilities: dict[str, list[str]]) -> None:
    if not isinstance(capabilities, dict) or not capabilities:
        raise ValueError("capabilities must map each category to its capability names, e.g. "
                         "{'chat': ['empathy', 'proactivity']}")
    for category, caps in capabilities.items():
        if isinstance(caps, str) or not caps or not all(isinstance(c, str) and c.strip() for c in caps):
            raise ValueError(f"capabilities[{category!r}] must be a non-empty list of names, got {caps!r}")
        if len(set(caps)) != len(caps):
            raise ValueError(f"capabilities[{category!r}] lists a capability twice: {caps}")
    for s in samples:
        if s.category is None:
            raise ValueError(f"sample {s.id}: category is None; assign categories (e.g. with the router) "
                             f"before judge labeling")
        if s.category not in capabilities:
            raise ValueError(f"sample {s.id}: category {s.category!r} has no capability points; "
                             f"known categories: {sorted(capabilities)}")


def label_samples(samples: list[Sample], capabilities: dict[str, list[str]], cfg: JudgeConfig,
                  progress: bool = True) -> LabelReport:
    """Fill ``sample.capability_prefs[cap]`` with swap-consistent judge verdicts for every capability of
    each sample's category and every pair of its responses (whatever their human ranks).

    Runs its own event loop; from async code, await :func:`label_samples_async`. Samples are modified
    only when every question was answered; on an error the answers so far stay in the cache.
    """
    return asyncio.run(label_samples_async(samples, capabilities, cfg, progress))


async def label_samples_async(samples: list[Sample], capabilities: dict[str, list[str]], cfg: JudgeConfig,
                              progress: bool = True) -> LabelReport:
    """The async body of :func:`label_samples`."""
    from tqdm.auto import tqdm

    _validate(samples, capabilities)
    report = LabelReport()
    comparisons: list[tuple[Sample, str, int, int, Key, Key]] = []
    questions: dict[Key, list[dict[str, str]]] = {}
    for s in samples:
        for cap in capabilities[s.category]:  # type: ignore[index]
            desc = cfg.capability_descriptions.get(cap, "")
            n = len(s.responses)
            for i in range(n):
                for j in range(i + 1, n):
                    keys = []
                    for order, (a, b) in (("ab", (i, j)), ("ba", (j, i))):
                        msgs = build_messages(s.context, s.responses[a], s.responses[b], cap, desc)
                        key = (question_sha256(msgs), order)
                        questions.setdefault(key, msgs)
                        keys.append(key)
                    comparisons.append((s, cap, i, j, keys[0], keys[1]))
    report.questions_total = len(questions)

    with AnswerCache(cfg.cache_path) as cache, \
            tqdm(total=len(questions), desc=f"judge {cfg.model}", unit="q", disable=not progress) as bar:
        contents: dict[Key, str | None] = {k: a.content for k, a in cache.get_many(cfg.model, list(questions)).items()}
        pending = [(key, msgs) for key, msgs in questions.items() if key not in contents]
        report.cache_hits = len(contents)
        bar.update(report.cache_hits)
        if pending:
            await _ask_pending(pending, cfg, cache, contents, report, bar)

    new_prefs: dict[int, dict[str, list[tuple[int, int]]]] = {}
    for s, cap, i, j, key_ab, key_ba in comparisons:
        counts = report.per_capability.setdefault(cap, {"consistent": 0, "inconsistent": 0, "abstained": 0})
        v_ab, v_ba = parse_verdict(contents[key_ab]), parse_verdict(contents[key_ba])
        pair = _consistent(i, j, v_ab, v_ba)
        outcome = ("abstained" if v_ab is None or v_ba is None
                   else "consistent" if pair is not None else "inconsistent")
        counts[outcome] += 1
        setattr(report, outcome, getattr(report, outcome) + 1)
        prefs = new_prefs.setdefault(id(s), {}).setdefault(cap, [])
        if pair is not None:
            prefs.append(pair)
    for s in samples:
        s.capability_prefs.update(new_prefs.get(id(s), {}))
    logger.info("judge labeling: %d questions (%d asked, %d cached, %d retries); %d consistent, "
                "%d inconsistent, %d abstained comparisons", report.questions_total, report.asked,
                report.cache_hits, report.retries, report.consistent, report.inconsistent, report.abstained)
    return report


async def _ask_pending(pending: list[tuple[Key, list[dict[str, str]]]], cfg: JudgeConfig, cache: AnswerCache,
                       contents: dict[Key, str | None], report: LabelReport, bar: Any) -> None:
    """Ask every pending question with ``cfg.concurrency`` workers; store each answer as it arrives."""
    todo = iter(pending)  # shared by the workers: next() never yields to the event loop
    if cfg.api_key_env and not os.environ.get(cfg.api_key_env):
        logger.info("$%s is not set in this process: judge requests carry no API key", cfg.api_key_env)

    async with JudgeClient(cfg) as client:
        async def worker() -> None:
            for key, msgs in todo:
                answer = await client.ask(msgs)
                cache.put(cfg.model, key[0], key[1],
                          CachedAnswer(answer.content, answer.prompt_tokens, answer.completion_tokens))
                contents[key] = answer.content
                report.asked += 1
                report.prompt_tokens += answer.prompt_tokens
                report.completion_tokens += answer.completion_tokens
                bar.update(1)

        tasks = [asyncio.ensure_future(worker()) for _ in range(min(cfg.concurrency, len(pending)))]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            report.retries += client.num_retries
