"""Every route of the served app over real HTTP: rewards equal in-process scoring of the same bundle,
model info, health, OpenAPI, auth."""

from __future__ import annotations

import pytest
from serve_fixtures import LIMITS, MODEL, TAXONOMY, in_process

from dmoerm.data.records import Turn

pytestmark = [pytest.mark.ray, pytest.mark.integration, pytest.mark.slow]
CONVERSATION = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "my cat is sad, any advice?"}]
RESPONSES = ["spend time with it and keep a routine", "ugh, cats", "take it to a vet if it stops eating"]


def turns(messages: list[dict]) -> list[Turn]:
    return [Turn(m["role"], m["content"]) for m in messages]


def test_reward_matches_in_process_scoring(server):
    with server.client() as c:
        r = c.post("/v1/reward", json={"messages": CONVERSATION, "responses": RESPONSES})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == MODEL and body["version"] in server.bundles
    expected = in_process(server, body["version"], [turns(CONVERSATION)] * 3, RESPONSES)
    assert body["rewards"] == pytest.approx([s.reward for s in expected], abs=1e-5)
    assert body["category"] == expected[0].category and body["category_source"] == "router"
    assert body["category_prob"] == pytest.approx(expected[0].category_prob, abs=1e-5)
    for got, want in zip(body["capability_scores"], expected):
        assert set(got) == set(TAXONOMY[body["category"]])
        assert got == pytest.approx(want.capability_scores, abs=1e-5)
    assert len(body["truncation"]) == 3 and body["truncated"] is False


def test_batch_form_with_a_category_override(server):
    items = [{"prompt": "what is 2+2?", "response": "4"},
             {"messages": CONVERSATION, "responses": RESPONSES[:2], "category": "qa"}]
    with server.client() as c:
        r = c.post("/v1/reward", json={"model": MODEL, "inputs": items})
    assert r.status_code == 200, r.text
    body = r.json()
    v = body["version"]
    first, second = body["results"]
    want_first = in_process(server, v, [[Turn("user", "what is 2+2?")]], ["4"])
    want_second = in_process(server, v, [turns(CONVERSATION)] * 2, RESPONSES[:2], ["qa", "qa"])
    assert first["rewards"] == pytest.approx([want_first[0].reward], abs=1e-5)
    assert second["category"] == "qa" and second["category_source"] == "override" and second["category_prob"] == 1.0
    assert second["rewards"] == pytest.approx([s.reward for s in want_second], abs=1e-5)
    assert set(second["capability_scores"][0]) == {"correctness"}


def test_long_texts_are_truncated_and_say_so(server):
    long_response = " ".join(f"word{i}" for i in range(300))  # far over the tiny model's 64 tokens
    with server.client() as c:
        body = c.post("/v1/reward", json={"prompt": "tell me everything", "responses": ["short", long_response]}).json()
    assert body["truncated"] is True
    short, long = body["truncation"]
    assert short["context_tokens_dropped"] == short["response_tokens_dropped"] == 0
    assert long["response_tokens_dropped"] > 200 and long["tokens"] == 64


def test_models_health_and_openapi(server):
    with server.client() as c:
        models = c.get("/v1/models").json()
        health = c.get("/healthz")
        doc = c.get("/openapi.json").json()
    info = models["data"][0]
    assert info["id"] == MODEL and info["categories"] == TAXONOMY and info["max_length"] == 64
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert {"/v1/reward", "/get_reward", "/classify", "/v1/models", "/healthz"} <= set(doc["paths"])
    schemas = doc["components"]["schemas"]
    assert {"RewardRequest", "GetRewardRequest", "ClassifyRequest", "ClassifyResponse"} <= set(schemas)
    ref = doc["paths"]["/v1/reward"]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert ref.endswith("/RewardRequest")


@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_auth_is_required(server, token):
    with server.client(token=token) as c:
        r = c.post("/v1/reward", json={"prompt": "hi", "response": "hello"})
        models = c.get("/v1/models")
    assert r.status_code == 401 and models.status_code == 401
    assert "bearer token" in r.json()["error"]["message"]


def test_limits_are_the_configured_ones(server):
    with server.client() as c:
        r = c.post("/v1/reward", json={"prompt": "hi", "responses": ["x"] * (LIMITS["max_responses"] + 1)})
    assert r.status_code == 413 and r.json()["error"]["param"] == "responses"
