"""The router is trained on exactly the features it scores with: ``cfg.router``'s input settings."""

from __future__ import annotations

import pytest
import torch
from tiny import advice_prompt, build_reward_model, pairwise_samples, tiny_backbone, user

from dmoerm.config import load_config
from dmoerm.data.records import Sample
from dmoerm.modeling.router import RouterInput, context_features
from dmoerm.stages.route import assign_categories, train_router_on


def _config(router: dict):
    return load_config(data={
        "taxonomy": [{"name": "chat", "capabilities": ["empathy"]}, {"name": "advice", "capabilities": ["logic"]}],
        "data": {"sources": [{"path": "a.jsonl", "format": "hh", "category": "chat"}]},
        "labels": {"source": "dataset", "datasets": {"empathy": [{"path": "e.jsonl", "format": "hh"}],
                                                     "logic": [{"path": "l.jsonl", "format": "hh"}]}},
        "router": {**router, "train": {"lr": 1e-2, "epochs": 3, "batch_size": 8, "patience": 3}}})


def _splits() -> dict[str, list[Sample]]:
    chat = pairwise_samples(12, category="chat")
    advice = [Sample(id=f"a{i}", context=user(advice_prompt(i)), responses=["sure", "no"], ranks=[1, 2],
                     category="advice") for i in range(12)]
    return {"phase1": chat[:8] + advice[:8], "phase3": [], "val": chat[8:] + advice[8:]}


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_router_training_and_scoring_read_the_same_features(kind):
    bb = tiny_backbone(kind)
    cfg = _config({"layers": 1, "max_context_tokens": 10})
    head, metrics = train_router_on(bb, _splits(), cfg)
    expected = RouterInput(1, 10, "context" if kind == "bert" else "prefix")
    assert head.inputs == expected and "router_val_accuracy" in metrics
    model = build_reward_model(bb, {"chat": ["empathy"], "advice": ["logic"]})
    model.router = head.eval()
    model.router_inputs = head.inputs.resolve(bb)
    contexts = [s.context for s in _splits()["val"]]
    with torch.no_grad():
        trained_on = head(context_features(bb, contexts, cfg.router)).softmax(-1)  # what training computed
        full_trunk = head(context_features(bb, contexts, RouterInput())).softmax(-1)
    scored = model.score(contexts, ["ok"] * len(contexts))
    assert [s.category_prob for s in scored] == pytest.approx(trained_on.max(-1).values.tolist(), abs=1e-5)
    assert not torch.allclose(trained_on, full_trunk, atol=1e-4)  # the settings really change the features
    unlabelled = [Sample(id=f"u{i}", context=c, responses=["x", "y"], ranks=[1, 2]) for i, c in enumerate(contexts)]
    assert assign_categories(bb, head, unlabelled) == len(unlabelled)
    assert [s.category for s in unlabelled] == [s.category for s in scored]
