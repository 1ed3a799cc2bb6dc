"""The composed reward model: routing, forced categories, and batching that changes no score."""

from __future__ import annotations

import pytest
import torch
from tiny import build_reward_model, tiny_backbone, user

from dmoerm.modeling.backbone import length_batches
from dmoerm.modeling.reward_model import RewardModel, SingleRewardModel
from dmoerm.modeling.router import RouterHead
from dmoerm.modeling.top import TopStack, run_experts

TAXONOMY = {"chat": ["empathy", "logic"], "qa": ["correctness"]}
CONTEXTS = [user("hello, how are you?"), user("what is the capital of France?"), user("hi"),
            user("please explain photosynthesis in detail to a child"), user("hello, how are you?")]
RESPONSES = ["fine, thanks", "Paris", "hey", "plants eat light, more or less, and make sugar from air", "bad"]


@pytest.fixture(scope="module")
def model() -> RewardModel:
    return build_reward_model(tiny_backbone("bert"), TAXONOMY)


def _by_hand(model: RewardModel, context, response: str, category: str) -> tuple[float, list[float]]:
    bb, cat = model.backbone, model.categories[category]
    enc = bb.encode([context], [response])
    out = run_experts(cat.experts, cat.capabilities, bb, bb.trunk(enc), enc.attention_mask)
    return cat.aggregator(out.pooled).item(), out.scores[0].tolist()


def test_scores_do_not_depend_on_batching_or_on_the_other_rows(model):
    forced = ["chat", "qa", "qa", "chat", "qa"]  # both categories inside one length-sorted batch
    scores = model.score(CONTEXTS, RESPONSES, forced)
    assert [s.category for s in scores] == forced and all(s.category_prob == 1.0 for s in scores)
    for ctx, resp, cat, s in zip(CONTEXTS, RESPONSES, forced, scores):
        reward, caps = _by_hand(model, ctx, resp, cat)
        assert s.reward == pytest.approx(reward, abs=1e-5)
        assert list(s.capability_scores) == TAXONOMY[cat]
        assert list(s.capability_scores.values()) == pytest.approx(caps, abs=1e-5)


def test_routing_uses_the_router_argmax_per_context(model):
    names, probs, full = model.route(CONTEXTS)
    assert full.shape == (5, 2) and torch.allclose(full.sum(-1), torch.ones(5))
    assert names == [model.router.categories[i] for i in full.argmax(-1).tolist()]
    assert names[0] == names[4] and probs[0] == pytest.approx(probs[4])  # same context, same route
    scored = model.score(CONTEXTS, RESPONSES)
    assert [s.category for s in scored] == names
    assert [s.category_prob for s in scored] == pytest.approx(probs)


def test_score_samples_groups_scores_per_sample(model):
    from tiny import pairwise_samples

    samples = pairwise_samples(3, category="qa")
    grouped = model.score_samples(samples, use_known_category=True)
    assert [len(g) for g in grouped] == [2, 2, 2] and all(s.category == "qa" for g in grouped for s in g)
    flat = model.score([s.context for s in samples for _ in s.responses], [r for s in samples for r in s.responses],
                       ["qa"] * 6)
    assert [s.reward for g in grouped for s in g] == pytest.approx([s.reward for s in flat], abs=1e-6)


def test_bad_inputs_are_rejected(model):
    assert model.score([], []) == []
    with pytest.raises(ValueError, match="unknown category 'nope'"):
        model.score(CONTEXTS[:1], RESPONSES[:1], ["nope"])
    with pytest.raises(ValueError, match="2 contexts for 1 responses"):
        model.score(CONTEXTS[:2], RESPONSES[:1])
    cats = dict(model.categories)
    with pytest.raises(ValueError, match="router categories"):
        RewardModel(model.backbone, RouterHead(32, ["qa", "chat"]), cats)
    with pytest.raises(ValueError, match="distinct category names"):
        RouterHead(32, ["a", "a"])


def test_length_batches_sort_by_length_and_respect_both_caps():
    lengths = [5, 40, 7, 12, 3, 12, 100, 9]
    batches = length_batches(lengths, batch_size=3, max_batch_tokens=30)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(lengths)
    for b in batches:
        assert len(b) <= 3 and (len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 30)
    assert [[lengths[i] for i in b] for b in batches] == [[3, 5, 7], [9, 12], [12], [40], [100]]  # 3 * 12 > 30
    assert length_batches(lengths, batch_size=4) == [[4, 0, 2, 7], [3, 5, 1, 6]]
    with pytest.raises(ValueError, match="max_batch_tokens must be >= 1"):
        length_batches(lengths, 4, 0)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_token_capped_batches_stay_under_the_cap_and_change_no_reward(monkeypatch, kind):
    bb = tiny_backbone(kind)
    capped = build_reward_model(bb, TAXONOMY, batch_size=8, max_batch_tokens=40)
    one_by_one = build_reward_model(bb, TAXONOMY, batch_size=1)
    shapes: list[tuple[int, int]] = []
    real_pad = bb.pad
    monkeypatch.setattr(bb, "pad", lambda rows: shapes.append((len(rows), max(len(r.ids) for r in rows)))
                        or real_pad(rows))
    scored = capped.score(CONTEXTS, RESPONSES)
    assert shapes and all(n * t <= 40 or n == 1 for n, t in shapes) and max(n for n, _ in shapes) > 1
    alone = one_by_one.score(CONTEXTS, RESPONSES)
    assert [s.reward for s in scored] == pytest.approx([s.reward for s in alone], abs=1e-5)
    assert [s.category_prob for s in scored] == pytest.approx([s.category_prob for s in alone], abs=1e-5)
    single = SingleRewardModel(bb, TopStack(bb), batch_size=8, max_batch_tokens=40)
    shapes.clear()
    batched = single.score(CONTEXTS, RESPONSES)
    assert shapes and all(n * t <= 40 or n == 1 for n, t in shapes)
    assert batched == pytest.approx(SingleRewardModel(bb, single.top, batch_size=1).score(CONTEXTS, RESPONSES),
                                    abs=1e-5)


def test_scores_report_row_tokens_and_truncation():
    bb = tiny_backbone("bert", max_length=24)
    model = build_reward_model(bb, TAXONOMY)
    long_ctx = user(" ".join(f"word{i}" for i in range(60)))
    long_resp = " ".join(["gamma"] * 60)
    scores = model.score([long_ctx, user("hi")], [long_resp, "yo"])
    enc = bb.encode([long_ctx, user("hi")], [long_resp, "yo"])
    assert scores[0].tokens == 24 and scores[1].tokens == int(enc.attention_mask[1].sum())
    assert scores[0].context_tokens_dropped == int(enc.context_dropped[0]) > 0
    assert scores[0].response_tokens_dropped == int(enc.response_dropped[0]) > 0
    assert (scores[1].context_tokens_dropped, scores[1].response_tokens_dropped) == (0, 0)


def test_scores_report_kept_response_tokens_and_a_digest_of_the_model_input():
    bb = tiny_backbone("bert", max_length=24)
    model = build_reward_model(bb, TAXONOMY)
    ctx = user("hi")
    head = " ".join(["gamma"] * 30)
    responses = [head + " alpha", head + " beta", "short one", "short two"]
    scores = model.score([ctx] * 4, responses)
    full = [len(bb.tokenizer(r, add_special_tokens=False)["input_ids"]) for r in responses]
    for s, n in zip(scores, full):
        assert s.response_tokens + s.response_tokens_dropped == n and s.response_tokens > 0
    assert scores[0].response_tokens_dropped > 0 and scores[2].response_tokens_dropped == 0
    assert scores[0].input_digest == scores[1].input_digest  # they differ only past the cut
    assert len({s.input_digest for s in scores[1:]}) == 3 and all(s.input_digest for s in scores)


def _rows_through_trunk(bb) -> tuple[list[int], object]:
    """Rows entering the trunk's last block, per forward (the embedding-only passes of layer_inputs stop
    before it)."""
    rows: list[int] = []
    handle = bb.layers[bb.split - 1].register_forward_pre_hook(lambda _m, args: rows.append(args[0].size(0)))
    return rows, handle


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_score_with_baseline_runs_the_trunk_once_per_row_for_both_models(kind):
    from tiny import pairwise_samples

    from dmoerm.data.records import Sample
    from dmoerm.modeling.reward_model import score_with_baseline

    bb = tiny_backbone(kind)
    model = build_reward_model(bb, TAXONOMY, batch_size=3)
    baseline = SingleRewardModel(bb, TopStack(bb), batch_size=5)
    samples = pairwise_samples(4, category="chat") + [
        Sample(f"r{i}", ctx, ["one answer", "a much longer second answer here", "third"], [2, 1, 3], "qa")
        for i, ctx in enumerate(CONTEXTS[:2])]
    num_rows = sum(len(s.responses) for s in samples)
    rows, handle = _rows_through_trunk(bb)
    try:
        alone = model.score_samples(samples)
        routed_alone = sum(rows)  # the scored rows, plus any context pass of routing
        separate = baseline.score_samples(samples)
        assert sum(rows) == routed_alone + num_rows  # the baseline's own trunk pass
        rows.clear()
        both, base = score_with_baseline(model, baseline, samples)
        assert sum(rows) == routed_alone  # the baseline added no trunk row
        rows.clear()
        forced, _ = score_with_baseline(model, baseline, samples, use_known_category=True)
        assert sum(rows) == num_rows  # no routing pass: exactly one trunk pass per row for both models
    finally:
        handle.remove()
    assert [s.reward for g in both for s in g] == pytest.approx([s.reward for g in alone for s in g], abs=1e-6)
    assert [s.category for g in both for s in g] == [s.category for g in alone for s in g]
    assert [r for g in base for r in g] == pytest.approx([r for g in separate for r in g], abs=1e-6)
    assert [len(g) for g in base] == [len(s.responses) for s in samples]
    assert [g[0].category for g in forced] == ["chat"] * 4 + ["qa"] * 2
