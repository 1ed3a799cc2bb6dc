"""A real local OpenAI-compatible judge: a stdlib HTTP server on 127.0.0.1 (port 0) in a thread.

It speaks ``POST /v1/chat/completions`` and decides each answer with a *policy* that reads the two
responses out of the prompt, so both a swap-consistent judge (``prefer_longer``, ``prefer_marker``) and a
position-biased one (``always_a``) can be tested. Failures are injected per question: the first
``fail_first`` calls of every question get ``fail_status`` (429 with ``Retry-After``, 500, 400, ...) or,
with ``fail_status=0``, a stall longer than the client's timeout. ``refuse_after_answers`` makes the
judge refuse (HTTP 400) everything once it has answered that many questions: a labeling run dies there.

Counters: ``calls`` and ``answered`` per question (sha256 of the user message), ``max_inflight``, the
``Authorization`` headers seen and every prompt. Use as a context manager, or through the ``fake_judge``
fixture of ``tests/labeling/conftest.py``. ``python tests/fake_judge.py --latency 0.05`` serves standalone
and prints ``PORT <n>`` on its first line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_RESPONSES_RE = re.compile(r"\[Response A\]\n(.*?)\n\[End of Response A\].*?"
                           r"\[Response B\]\n(.*?)\n\[End of Response B\]", re.S)
_CAPABILITY_RE = re.compile(r"^Which response is better with respect to (.+?)(?:: .*)?\?$", re.M)


@dataclass(frozen=True)
class Question:
    """What a policy sees of one request."""

    capability: str
    response_a: str
    response_b: str
    prompt: str


Policy = Callable[[Question], str]


def prefer_longer(q: Question) -> str:
    """Swap-consistent: the longer response wins."""
    return "A" if len(q.response_a) > len(q.response_b) else "B"


def always_a(q: Question) -> str:
    """Position-biased: always the first response shown."""
    return "A"


def prefer_marker(marker: str, fmt: str = "{}") -> Policy:
    """Swap-consistent: the response containing ``marker`` wins; answer formatted with ``fmt``."""
    return lambda q: fmt.format("A" if marker in q.response_a else "B")


def constant(text: str) -> Policy:
    """Always the same reply, e.g. garbage like ``"Both are fine"``."""
    return lambda q: text


def per_capability(policies: dict[str, Policy]) -> Policy:
    """A different policy per capability."""
    return lambda q: policies[q.capability](q)


class FakeJudge:
    """A chat-completions judge server on 127.0.0.1; settings are plain attributes, changeable any time."""

    def __init__(self, policy: Policy = prefer_longer, *, latency_s: float = 0.0, fail_first: int = 0,
                 fail_status: int = 429, retry_after: float | None = 0.01, stall_s: float = 1.0,
                 refuse_after_answers: int | None = None) -> None:
        self.policy = policy
        self.latency_s = latency_s
        self.fail_first = fail_first
        self.fail_status = fail_status
        self.retry_after = retry_after
        self.stall_s = stall_s
        self.refuse_after_answers = refuse_after_answers
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.reset()

    def reset(self) -> None:
        """Zero every counter."""
        with self._lock:
            self.calls: Counter[str] = Counter()
            self.answered: Counter[str] = Counter()
            self.auth_headers: list[str | None] = []
            self.prompts: list[str] = []
            self.inflight = 0
            self.max_inflight = 0
            self._granted = 0  # answers promised so far: makes refuse_after_answers exact under concurrency

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())

    @property
    def total_answered(self) -> int:
        return sum(self.answered.values())

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("FakeJudge is not started")
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def start(self) -> FakeJudge:
        judge = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, like a real judge
            disable_nagle_algorithm = True  # headers and body are separate writes: no 40 ms delayed-ACK stall

            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                judge._handle(self)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-judge", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeJudge:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ one request

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        if h.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
            return _send(h, 404, _error(f"no route {h.path}"))
        try:
            req = json.loads(body)
            user = [m for m in req["messages"] if m["role"] == "user"][-1]["content"]
            model = req["model"]
        except (ValueError, KeyError, IndexError, TypeError):
            return _send(h, 400, _error("body must be a chat completion request with model and messages"))
        qkey = hashlib.sha256(user.encode("utf-8")).hexdigest()
        with self._lock:
            self.calls[qkey] += 1
            n_call = self.calls[qkey]
            self.auth_headers.append(h.headers.get("Authorization"))
            self.prompts.append(user)
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
            refuse = self.refuse_after_answers is not None and self._granted >= self.refuse_after_answers
            if not refuse and n_call > self.fail_first:
                self._granted += 1
        status, payload, headers = 200, None, {}
        try:
            time.sleep(self.latency_s)
            if refuse:
                status, payload = 400, _error(f"fake judge refuses after {self.refuse_after_answers} answers")
            elif n_call <= self.fail_first and self.fail_status == 0:
                time.sleep(self.stall_s)
                status, payload = 504, _error("stalled past the client timeout")
            elif n_call <= self.fail_first:
                status, payload = self.fail_status, _error(f"injected failure {n_call}/{self.fail_first}")
                if self.fail_status == 429 and self.retry_after is not None:
                    headers["Retry-After"] = str(self.retry_after)
            else:
                m, cap = _RESPONSES_RE.search(user), _CAPABILITY_RE.search(user)
                if m is None or cap is None:
                    status, payload = 400, _error("prompt lacks [Response A]/[Response B] or the question")
                else:
                    content = self.policy(Question(cap.group(1), m.group(1), m.group(2), user))
                    payload = {
                        "id": f"chatcmpl-{qkey[:12]}", "object": "chat.completion", "model": model,
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": content}}],
                        "usage": {"prompt_tokens": len(user.split()), "completion_tokens": 1,
                                  "total_tokens": len(user.split()) + 1},
                    }
        finally:
            with self._lock:  # before the reply is written, so a client's next request never overlaps it
                self.inflight -= 1
                if status == 200:
                    self.answered[qkey] += 1
        _send(h, status, payload, headers)


def _error(message: str) -> dict:
    return {"error": {"message": message, "type": "invalid_request_error"}}


def _send(h: BaseHTTPRequestHandler, status: int, payload: object,
          headers: dict[str, str] | None = None) -> None:
    data = json.dumps(payload).encode("utf-8")
    try:
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)
    except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
        pass


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.05, help="seconds per answer")
    args = parser.parse_args()
    with FakeJudge(latency_s=args.latency) as server:
        print(f"PORT {server.url.rsplit(':', 1)[1].split('/')[0]}", flush=True)
        threading.Event().wait()
