"""The bundle: safetensors + JSON only, reloads to the same scores, refuses a different base, works on S3."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tiny import TINY_LORA, build_reward_model, save_tiny, user

from dmoerm.bundle import BUNDLE_FORMAT, load_bundle, read_meta, save_bundle
from dmoerm.data.records import Turn
from dmoerm.modeling.aggregator import AggregatorConfig
from dmoerm.modeling.reward_model import RewardModel
from dmoerm.modeling.router import RouterInput, context_features

pytestmark = pytest.mark.usefixtures("torch_single_thread")

CONTEXTS = [user("hello, how are you today?"), user("what is the boiling point of water at sea level?"),
            [Turn("system", "be brief"), Turn("user", "hi"), Turn("assistant", "hello"), Turn("user", "joke?")],
            user("hello, how are you today?")]
RESPONSES = ["great, thanks for asking!", "100 degrees Celsius", "why did the chicken cross the road", "meh"]


def _assert_same_scores(a: RewardModel, b: RewardModel) -> None:
    for forced in (None, ["qa", "chat", "qa", "chat"]):
        sa, sb = a.score(CONTEXTS, RESPONSES, forced), b.score(CONTEXTS, RESPONSES, forced)
        for x, y in zip(sa, sb):
            assert x.category == y.category
            assert y.reward == pytest.approx(x.reward, abs=1e-5)
            assert y.category_prob == pytest.approx(x.category_prob, abs=1e-5)
            assert list(y.capability_scores) == list(x.capability_scores)
            assert list(y.capability_scores.values()) == pytest.approx(list(x.capability_scores.values()), abs=1e-5)


def test_reloaded_bundle_scores_like_the_saved_model(tiny_bundle, tiny_bert_dir):
    path, model, baseline = tiny_bundle
    loaded = load_bundle(path)  # the base is read from the reference recorded in bundle.json
    assert loaded.meta["base"]["reference"] == tiny_bert_dir
    assert list(loaded.model.categories) == ["chat", "qa"]
    assert loaded.model.categories["chat"].capabilities == ["empathy", "logic"]
    _assert_same_scores(model, loaded.model)
    assert loaded.baseline is not None
    assert loaded.baseline.score(CONTEXTS, RESPONSES) == pytest.approx(baseline.score(CONTEXTS, RESPONSES), abs=1e-5)


def test_bundle_json_records_the_base_and_the_recipe(tiny_bundle, tiny_bert_dir):
    path, model, _ = tiny_bundle
    meta = json.loads((Path(path) / "bundle.json").read_text())
    assert meta == read_meta(path) and meta["format"] == BUNDLE_FORMAT
    base = meta["base"]
    assert base["reference"] == tiny_bert_dir and base["fingerprint"] == model.backbone.fingerprint()
    assert len(base["fingerprint"]) == 64 and base["model_type"] == "bert"
    assert (base["top_layers"], base["pooling"], base["max_length"], base["hidden_size"]) == (1, "cls", 64, 32)
    assert [c["name"] for c in meta["taxonomy"]] == ["chat", "qa"]
    assert meta["taxonomy"][0]["capabilities"] == ["empathy", "logic"]
    assert meta["lora"]["r"] == TINY_LORA.r and meta["aggregator"]["activation"] == "prelu"
    assert meta["metrics"] == {"overall": 0.5} and meta["baseline"] is True


def test_bundle_holds_only_safetensors_json_and_tokenizer_files(tiny_bundle):
    root = Path(tiny_bundle[0])
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert {"bundle.json", "router.safetensors", "baseline.safetensors", "categories/chat/experts.safetensors",
            "categories/chat/aggregator.safetensors", "categories/qa/experts.safetensors",
            "categories/qa/aggregator.safetensors"} <= set(files)
    assert not [f for f in files if Path(f).suffix in {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}]
    for f in files:
        if f.startswith("tokenizer/"):
            assert Path(f).suffix in {".json", ".txt", ".model"}, f
        else:
            assert Path(f).suffix in {".safetensors", ".json"}, f
    assert any(f.startswith("tokenizer/") for f in files)


def test_loading_on_a_different_base_is_refused(tiny_bundle, tmp_path):
    other = save_tiny(tmp_path / "other-base", "bert", seed=1)
    with pytest.raises(ValueError, match="fingerprint differs"):
        load_bundle(tiny_bundle[0], base=other)


def test_not_a_bundle_and_unknown_formats_are_refused(tiny_bundle, tmp_path):
    with pytest.raises(ValueError, match="bundle.json is missing"):
        load_bundle(tmp_path)
    meta = json.loads((Path(tiny_bundle[0]) / "bundle.json").read_text())
    (tmp_path / "bundle.json").write_text(json.dumps({**meta, "format": BUNDLE_FORMAT + 1}))
    with pytest.raises(ValueError, match="is not supported"):
        read_meta(tmp_path)


def test_bad_category_names_are_refused(tiny_bundle, tmp_path):
    bad = build_reward_model(tiny_bundle[1].backbone, {"chat\n": ["x"]})  # "../escape" is fine: escaped (test_names)
    with pytest.raises(ValueError, match="category name"):
        save_bundle(tmp_path / "b", bad, lora=TINY_LORA, aggregator=AggregatorConfig(), router_width=0)


@pytest.mark.slow
@pytest.mark.integration
def test_save_and_load_through_s3(tiny_bundle, s3_server):
    _, model, _ = tiny_bundle
    bucket = s3_server.create_bucket("dmoerm-bundles")
    uri = f"s3://{bucket}/runs/r1/bundle"
    assert save_bundle(uri, model, lora=TINY_LORA, aggregator=AggregatorConfig(), router_width=0) == uri
    keys = {o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]}
    assert "runs/r1/bundle/bundle.json" in keys and "runs/r1/bundle/categories/qa/experts.safetensors" in keys
    loaded = load_bundle(uri)
    assert loaded.baseline is None
    _assert_same_scores(model, loaded.model)


def test_bundle_round_trips_the_router_inputs(tiny_bundle, tmp_path):
    backbone = tiny_bundle[1].backbone
    inputs = RouterInput(layers=1, max_context_tokens=8)
    model = build_reward_model(backbone, {"chat": ["empathy"], "qa": ["correctness"]}, router_inputs=inputs)
    path = save_bundle(tmp_path / "b", model, lora=TINY_LORA, aggregator=AggregatorConfig(), router_width=0)
    entry = read_meta(path)["router"]
    assert (entry["layers"], entry["max_context_tokens"], entry["source"]) == (1, 8, "context")
    loaded = load_bundle(path, backbone=backbone)
    assert loaded.model.router_inputs == RouterInput(1, 8, "context")
    names, probs, _ = loaded.model.route(CONTEXTS)
    assert (names, probs) == model.route(CONTEXTS)[:2]
    _assert_same_scores(model, loaded.model)


def test_bundles_without_router_inputs_route_from_the_whole_trunk_as_before(tiny_bundle, tmp_path):
    src, model, _ = tiny_bundle
    old = tmp_path / "old"
    shutil.copytree(src, old)
    meta = json.loads((old / "bundle.json").read_text())
    meta["router"] = {"width": 0, "features": "trunk-mean-pool of the context"}  # what older bundles hold
    (old / "bundle.json").write_text(json.dumps(meta))
    loaded = load_bundle(old, backbone=model.backbone)
    assert loaded.model.router_inputs == RouterInput(None, None, "context")
    feats = context_features(model.backbone, CONTEXTS, RouterInput(source="context"))  # full trunk, whole context
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.route(CONTEXTS)[2], model.router(feats).softmax(-1), atol=1e-6,
                                   rtol=0)
    _assert_same_scores(model, loaded.model)


def test_a_category_subset_shares_the_base_and_scores_like_the_whole_bundle(tiny_bundle):
    from tiny import user

    from dmoerm.bundle import load_bundle

    path, _, _ = tiny_bundle
    whole = load_bundle(path)
    qa = load_bundle(path, categories=["qa"], backbone=whole.model.backbone)
    assert list(qa.model.categories) == ["qa"] and qa.baseline is None
    assert qa.model.backbone is whole.model.backbone
    ctx, resp = [user("what is 2+2?"), user("a cat?")], ["4", "a small feline"]
    got = qa.model.score(ctx, resp, ["qa", "qa"])
    want = whole.model.score(ctx, resp, ["qa", "qa"])
    assert [g.reward for g in got] == pytest.approx([w.reward for w in want], abs=1e-6)
    with pytest.raises(ValueError, match="not in this bundle"):
        load_bundle(path, categories=["cooking"], backbone=whole.model.backbone)
