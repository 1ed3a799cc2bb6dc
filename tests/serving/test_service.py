"""dmoerm.serving.service in process: the served model's health probe, request parsing with limits and
field names, and response shapes (no Ray: the HTTP layer is tested in tests/serve)."""

from __future__ import annotations

import math
import threading
import time

import pytest
import torch

from dmoerm.serving.api import ClassifyRequest, GetRewardRequest, RequestError, RewardRequest
from dmoerm.serving.service import (
    ServedModel,
    ServeLimits,
    classify_response,
    conversations_from_classify,
    conversations_from_reward,
    get_reward_response,
)


@pytest.fixture(scope="module")
def served(tiny_bundle) -> ServedModel:
    return ServedModel.load(tiny_bundle[0])


def test_probe_is_a_real_forward_and_fails_on_a_broken_model(served, tiny_bundle):
    assert math.isfinite(served.probe())
    broken = ServedModel.load(tiny_bundle[0])
    with torch.no_grad():
        for cat in broken.model.categories.values():
            next(cat.aggregator.parameters()).fill_(float("nan"))
    with pytest.raises(RuntimeError, match="non-finite"):
        broken.probe()


def test_probe_waits_behind_a_stuck_forward(served):
    """A forward that never returns holds the model's lock: the health probe cannot pass, so Serve's health
    check (which runs the probe) times out and the replica is replaced."""
    done = threading.Event()
    with served.lock:
        t = threading.Thread(target=lambda: (served.probe(), done.set()), daemon=True)
        t.start()
        time.sleep(0.5)
        assert not done.is_set()
    t.join(10)
    assert done.is_set()


def test_category_subsets_share_the_base(served):
    qa = served.with_category("qa")
    assert qa.loaded_categories == ["qa"] and set(qa.categories) == {"chat", "qa"}
    assert qa.model.backbone is served.model.backbone and qa.version == served.version


def test_limits_name_the_field(served):
    limits = ServeLimits(max_items=2, max_responses=2, max_text_chars=10)
    with pytest.raises(RequestError) as e:
        conversations_from_reward(RewardRequest.model_validate(
            {"inputs": [{"prompt": "a", "response": "b"}, {"prompt": "a", "responses": ["x", "y", "z"]}]}),
            served, limits)
    assert e.value.status == 413 and e.value.field == "inputs[1].responses"
    with pytest.raises(RequestError) as e:
        conversations_from_reward(RewardRequest.model_validate(
            {"messages": [{"role": "user", "content": "x" * 11}], "response": "b"}), served, limits)
    assert e.value.field == "messages[0].content"
    with pytest.raises(ValueError, match="max_items"):
        ServeLimits(max_items=0)


def test_response_shapes(served):
    convs = conversations_from_classify(ClassifyRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}),
        served, "auto", ServeLimits())
    assert [t.role for t in convs[0].context] == ["user"] and convs[0].responses == ["hello"]
    scores = served.score_rows([r for c in convs for r in c.rows()])
    out = classify_response(ClassifyRequest.model_validate({"input": "x", "use_activation": False}), scores, served)
    assert out.data[0].probs == [scores[0].reward] and out.usage.prompt_tokens == scores[0].tokens > 0
    logs = get_reward_response(scores, served.categories).extra_logs
    assert all(len(v) == 1 and isinstance(v[0], float) for v in logs.values())
    assert "capability_present/correctness" in logs  # "qa" has an expert "chat" lacks: its presence is logged
    assert GetRewardRequest.model_validate({"query": "one text"}).query == ["one text"]
