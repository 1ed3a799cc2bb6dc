"""dmoerm.client against a local HTTP server that misbehaves on purpose (503s with Retry-After, a stall,
a 4xx): retries, timeouts and errors. Its calls against the real served app are in tests/serve."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from dmoerm.client import AsyncRewardClient, RewardAPIError, RewardClient, trl_reward_function


class Flaky:
    """Answers the first ``fail`` requests with ``status`` (and Retry-After), then rewards = len(response)."""

    def __init__(self, fail: int = 0, status: int = 503, stall_s: float = 0.0) -> None:
        self.fail, self.status, self.stall_s, self.bodies, self.auth = fail, status, stall_s, [], []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):  # /v1/models: the client reads the server's item limit from it
                self._send(200, {"object": "list", "data": [{"limits": {"max_items": 5}}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.bodies.append(body)
                outer.auth.append(self.headers.get("Authorization"))
                if outer.stall_s and len(outer.bodies) == 1:
                    time.sleep(outer.stall_s)
                if len(outer.bodies) <= outer.fail:
                    self._send(outer.status, {"error": {"message": "busy", "param": "responses"}},
                               {"Retry-After": "0"})
                    return
                items = body.get("inputs") or [body]
                results = [{"rewards": [float(len(r)) for r in it["responses"]]} for it in items]
                self._send(200, {"results": results} if "inputs" in body else results[0])

            def _send(self, status, obj, headers=None):
                data = json.dumps(obj).encode()
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()


@pytest.fixture
def flaky(request):
    server = Flaky(**getattr(request, "param", {}))
    yield server
    server.close()


@pytest.mark.parametrize("flaky", [{"fail": 2}], indirect=True)
def test_retries_503_then_succeeds(flaky):
    with RewardClient(flaky.url, token="t", backoff_s=0.01) as c:
        out = c.reward("hi", ["abc", "de"])
    assert out["rewards"] == [3.0, 2.0] and len(flaky.bodies) == 3
    assert flaky.auth == ["Bearer t"] * 3


@pytest.mark.parametrize("flaky", [{"fail": 10, "status": 422}], indirect=True)
def test_a_4xx_is_raised_at_once_with_the_field(flaky):
    with RewardClient(flaky.url, backoff_s=0.01) as c, pytest.raises(RewardAPIError) as e:
        c.reward("hi", ["x"])
    assert e.value.status == 422 and e.value.field == "responses" and len(flaky.bodies) == 1


@pytest.mark.parametrize("flaky", [{"fail": 10}], indirect=True)
def test_gives_up_after_max_retries(flaky):
    with RewardClient(flaky.url, backoff_s=0.01, max_retries=2) as c, pytest.raises(RewardAPIError) as e:
        c.reward("hi", ["x"])
    assert e.value.status == 503 and len(flaky.bodies) == 3


@pytest.mark.parametrize("flaky", [{"stall_s": 1.0}], indirect=True)
def test_a_stalled_request_times_out_and_is_retried(flaky):
    with RewardClient(flaky.url, timeout_s=0.3, backoff_s=0.01) as c:
        assert c.reward("hi", ["abcd"])["rewards"] == [4.0]
    assert len(flaky.bodies) == 2


def test_no_retry_on_connection_refused_past_the_budget():
    with RewardClient("http://127.0.0.1:9", max_retries=1, backoff_s=0.01) as c, pytest.raises(httpx.TransportError):
        c.reward("hi", ["x"])


def test_batches_are_chunked_by_the_item_limit(flaky):
    items = [(f"p{i}", ["x" * i]) for i in range(7)]
    with RewardClient(flaky.url, max_items=3) as c:
        out = c.rewards(items)
    assert [r["rewards"][0] for r in out] == [float(i) for i in range(7)]
    assert [len(b["inputs"]) for b in flaky.bodies] == [3, 3, 1]


@pytest.mark.parametrize("flaky", [{"fail": 1}], indirect=True)
def test_async_client_retries_too(flaky):
    async def go():
        async with AsyncRewardClient(flaky.url, backoff_s=0.01) as c:
            return await c.reward([{"role": "user", "content": "hi"}], ["abc"])

    assert asyncio.run(go())["rewards"] == [3.0] and len(flaky.bodies) == 2
    assert flaky.bodies[-1]["messages"] == [{"role": "user", "content": "hi"}]


def test_trl_reward_function_sends_the_batch_in_one_request(flaky):
    f = trl_reward_function(flaky.url)
    prompts = [[{"role": "user", "content": "q1"}], "q2 plain"]
    completions = [[{"role": "assistant", "content": "four"}], "xy"]
    assert f(prompts=prompts, completions=completions, solution=["a", "b"]) == [4.0, 2.0]
    assert len(flaky.bodies) == 1 and flaky.bodies[0]["inputs"][1] == {"prompt": "q2 plain", "responses": ["xy"]}
    assert len(f(prompts=["p"] * 12, completions=["c"] * 12)) == 12
    assert [len(b["inputs"]) for b in flaky.bodies[1:]] == [5, 5, 2]  # the server's limit, read from /v1/models
    g = trl_reward_function(flaky.url, asynchronous=True)
    assert asyncio.run(g(prompts=prompts, completions=completions)) == [4.0, 2.0]
    with pytest.raises(ValueError, match="2 prompts for 1 completions"):
        f(prompts=prompts, completions=completions[:1])
