"""Bad input gets a 4xx JSON error naming the field, never a 5xx, and the app keeps serving; then a
schema-guided fuzz run of 1,000 generated requests gives zero 5xx."""

from __future__ import annotations

import json

import pytest
from serve_fixtures import LIMITS

pytestmark = [pytest.mark.ray, pytest.mark.integration, pytest.mark.slow]
OK = {"prompt": "hi", "response": "hello"}
MSG = [{"role": "user", "content": "hi"}]

CASES = [
    # (route, raw body or JSON, status, field named (None: no single field), words in the message)
    ("/v1/reward", b'{"prompt": "hi", "response": ', 400, None, "not valid JSON"),
    ("/v1/reward", b'\xff\xfe{"prompt": "x"}', 400, None, "UTF-8"),
    ("/v1/reward", b'{"prompt": "caf\xe9", "response": "x"}', 400, None, "UTF-8"),
    ("/v1/reward", b"", 400, None, "not valid JSON"),
    ("/v1/reward", [OK], 422, None, "JSON object"),
    ("/v1/reward", {"prompt": 3, "response": "x"}, 422, "prompt", "string"),
    ("/v1/reward", {"prompt": "hi", "responses": "not a list"}, 422, "responses", "list"),
    ("/v1/reward", {"prompt": "hi", "responses": ["a", 2]}, 422, "responses[1]", "string"),
    ("/v1/reward", {"prompt": "hi"}, 422, None, "'responses' or 'response'"),
    ("/v1/reward", {"response": "x"}, 422, None, "'messages' or 'prompt'"),
    ("/v1/reward", {"messages": [], "response": "x"}, 422, None, "at least one turn"),
    ("/v1/reward", {"prompt": "hi", "responses": []}, 422, None, "at least one response"),
    ("/v1/reward", {"messages": [{"role": "robot", "content": "x"}], "response": "x"}, 422, "messages[0].role", "user"),
    ("/v1/reward", {"messages": [{"role": "user"}], "response": "x"}, 422, "messages[0].content", "required"),
    ("/v1/reward", {"prompt": "hi", "response": "x", "respones": ["y"]}, 422, "respones", "not permitted"),
    ("/v1/reward", {"prompt": "hi", "response": "x", "category": "cooking"}, 422, "category", "unknown category"),
    ("/v1/reward", {"inputs": [OK, {"prompt": "q", "response": "a", "category": "nope"}]}, 422, "inputs[1].category",
     "unknown category"),
    ("/v1/reward", {"inputs": []}, 422, None, "at least one item"),
    ("/v1/reward", {"inputs": [OK] * (LIMITS["max_items"] + 1)}, 413, "inputs", "limit"),
    ("/v1/reward", {"prompt": "hi", "responses": ["x"] * (LIMITS["max_responses"] + 1)}, 413, "responses", "limit"),
    ("/v1/reward", {"prompt": "x" * (LIMITS["max_text_chars"] + 1), "response": "y"}, 413, "prompt", "characters"),
    ("/v1/reward", {"prompt": "hi", "response": "x", "model": "someone-else"}, 404, "model", "not served"),
    ("/v1/reward", {"prompt": "hi", "response": "y" * (LIMITS["max_body_bytes"] + 10)}, 413, None, "bytes"),
    ("/get_reward", {"queries": ["x"]}, 422, "query", "required"),
    ("/get_reward", {"query": []}, 422, None, "at least one"),
    ("/get_reward", {"query": [1, 2]}, 422, "query[0]", "string"),
    ("/get_reward", {"query": ["a", "b"], "prompts": ["a"]}, 422, None, "1 texts for 2 queries"),
    ("/get_reward", {"query": ["no template markers at all"]}, 422, "query[0]", ""),
    ("/classify", {"input": "x", "activation": True}, 422, "activation", "removed"),
    ("/classify", {"input": "x", "softmax": True}, 422, "softmax", "removed"),
    ("/classify", {"input": "x", "normalize": True}, 422, "normalize", "removed"),
    ("/classify", {"model": "m"}, 422, None, "'input' or 'messages'"),
    ("/classify", {"input": []}, 422, None, "at least one"),
    ("/classify", {"messages": MSG}, 422, None, "end with the assistant"),
    ("/classify", {"input": "x", "use_activation": "yes"}, 422, "use_activation", "bool"),
    ("/classify", {"input": "x", "truncate_prompt_tokens": 100000}, 400, "truncate_prompt_tokens", "max length"),
]


@pytest.mark.parametrize("route,body,status,field,words", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_input_is_a_named_4xx(server, route, body, status, field, words):
    with server.client() as c:
        r = c.post(route, content=body) if isinstance(body, bytes) else c.post(route, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == status and words in err["message"], err
    if field is not None:
        assert err["param"] == field, err


def test_wrong_method_and_unknown_route_are_json_errors(server):
    with server.client() as c:
        assert c.get("/v1/reward").status_code == 405
        r = c.post("/v2/nothing", json=OK)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"


def test_a_declared_oversized_body_is_refused_before_it_is_read(server):
    """A client declaring a gigabyte gets its 413 at once (raw socket: HTTP clients refuse to lie)."""
    import socket
    from urllib.parse import urlparse

    u = urlparse(server.url)
    with socket.create_connection((u.hostname, u.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/reward HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + server.token.encode() + b"\r\nContent-Length: 1000000000\r\n\r\n{}")
        head = ""
        while "\r\n\r\n" not in head or not head.rstrip().endswith("}"):
            chunk = sock.recv(65536).decode(errors="replace")
            if not chunk:
                break
            head += chunk
    assert head.startswith("HTTP/1.1 413"), head[:300]
    assert "limit" in head


def test_fuzzed_requests_never_get_a_5xx(server):
    """1,000 requests generated from the API's shapes: valid ones, each field replaced by arbitrary JSON,
    fields dropped or added, odd unicode, wrong types at every depth."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    text = st.text(max_size=40)
    anyjson = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | text,
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
                           max_leaves=12)
    message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "x"]), "content": text})
    reward = st.fixed_dictionaries({}, optional={
        "messages": st.lists(message, max_size=3) | anyjson, "prompt": text | anyjson,
        "responses": st.lists(text, max_size=4) | anyjson, "response": text | anyjson,
        "category": st.sampled_from(["chat", "qa", "nope"]) | anyjson, "model": text})
    templated = st.builds(lambda u, a: f"<|im_start|>user\n{u}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>",
                          text, text)
    get_reward = st.fixed_dictionaries({}, optional={"query": st.lists(templated | text, max_size=4) | anyjson,
                                                     "prompts": st.lists(text, max_size=4) | anyjson,
                                                     "labels": anyjson})
    classify = st.fixed_dictionaries({}, optional={
        "input": templated | st.lists(templated, max_size=3) | anyjson, "messages": st.lists(message, max_size=3),
        "use_activation": st.none() | st.booleans() | anyjson, "truncate_prompt_tokens": st.integers(-2, 10 ** 6),
        "model": text, "activation": st.booleans()})
    request = st.one_of(
        st.tuples(st.just("/v1/reward"),
                  reward | st.builds(lambda items: {"inputs": items}, st.lists(reward, max_size=3))),
        st.tuples(st.just("/get_reward"), get_reward), st.tuples(st.just("/classify"), classify),
        st.tuples(st.sampled_from(["/v1/reward", "/get_reward", "/classify"]), anyjson))
    seen: list[int] = []

    with server.client(timeout=60) as c:
        @settings(max_examples=1000, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(request)
        def send(req):
            route, body = req
            r = c.post(route, content=json.dumps(body).encode())
            seen.append(r.status_code)
            assert r.status_code < 500, (route, body, r.text)
            if r.status_code >= 400:
                assert r.json()["error"]["message"]

        send()
        assert len(seen) == 1000
        assert any(s == 200 for s in seen) and any(400 <= s < 500 for s in seen)
        r = c.post("/v1/reward", json=OK)
    assert r.status_code == 200 and len(r.json()["rewards"]) == 1
