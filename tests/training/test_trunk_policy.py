"""The trunk-cache policy (``model.trunk_cache``): cached shards and the recomputed trunk train the same
model, on a tiny decoder with last-token pooling, including the paper's ``top_layers`` = every block;
``auto`` recomputes a cache bigger than its budget; the cached policy reads shard by shard and never
holds every row; on S3 a batch downloads only the shards it needs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from tiny import NUM_LAYERS, pairwise_samples
from tiny_decoders import decoder_backbone, save_tiny_decoder

from dmoerm.bundle import load_bundle
from dmoerm.config import PipelineConfig, load_config
from dmoerm.data.splits import split_samples
from dmoerm.pipeline import train_locally
from dmoerm.stages.data import data_step, load_data
from dmoerm.stages.labels import label_step
from dmoerm.stages.route import route_step
from dmoerm.stages.store import StageStore
from dmoerm.stages.train import trunk_cache, trunk_step
from dmoerm.training.features import (
    CachedTrunk,
    RecomputedTrunk,
    TrunkCache,
    TrunkShardWriter,
    row_key,
    sample_rows,
)
from dmoerm.training.loop import TrainConfig
from dmoerm.training.phases import train_top

WORDS = ["garden", "cake", "bike", "tax", "gift", "cat", "printer", "essay", "train", "phone", "budget", "song"]
FAST = {"lr": 1e-2, "epochs": 4, "batch_size": 16, "patience": 2, "warmup_ratio": 0.0}


def _config(tmp: Path, base: str, data: dict[str, str], name: str, storage: str | None = None,
            **model) -> PipelineConfig:
    return load_config(data={
        "name": "trunk-policy", "output_dir": str(tmp / f"run-{name}"),
        "platform": {"storage_uri": storage or str(tmp / f"storage-{name}"), "tune": {"enabled": False}},
        "taxonomy": [{"name": "alpha", "capabilities": ["alpha_taste"]},
                     {"name": "beta", "capabilities": ["beta_taste"]}],
        "data": {"sources": [{"path": data["alpha"], "format": "dmoerm"}, {"path": data["beta"], "format": "dmoerm"}],
                 "splits": {"phase1": 0.4, "phase3": 0.2, "val": 0.1, "test": 0.3}},
        "labels": {"source": "dataset", "datasets": {"alpha_taste": [{"path": data["alpha"], "format": "dmoerm"}],
                                                     "beta_taste": [{"path": data["beta"], "format": "dmoerm"}]}},
        "model": {"base": base, "pooling": "last", "max_length": 48, "feature_batch_size": 16,
                  "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "trunk_shard_mb": 0.05, **model},
        "router": {"train": {"lr": 0.01, "epochs": 5, "batch_size": 16, "patience": 3}},
        "phase1": FAST, "phase2": {**FAST, "epochs": 1},
        "phase3": {"lr": 1e-2, "epochs": 4, "batch_size": 16, "patience": 3},
    })


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> dict[str, str]:
    """alpha prompts prefer the 'apple' answer, beta prompts the 'banana' one (as tests/jobs/pipeline_fixtures)."""
    folder, paths = tmp_path_factory.mktemp("trunk-policy-task"), {}
    for cat, good, bad in (("alpha", "apple", "banana"), ("beta", "banana", "apple")):
        rows = [{"id": f"{cat}-{i}", "category": cat,
                 "context": [{"role": "user", "content": f"{cat} {cat} question {i} about my {WORDS[i % 12]}"}],
                 "responses": [f"the {WORDS[i % 12]} {bad} answer {i % 7}",
                               f"the {WORDS[i % 12]} {good} answer {i % 5}"],
                 "ranks": [2, 1]} for i in range(80)]
        paths[cat] = str(folder / f"{cat}.jsonl")
        Path(paths[cat]).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def _trunk_info(cfg: PipelineConfig) -> dict:
    (done,) = Path(cfg.platform.storage_uri, "stages", "trunk").glob("*/DONE.json")
    return json.loads(done.read_text())


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "top_layers"), [("llama", NUM_LAYERS), ("qwen2", NUM_LAYERS), ("llama", 1)],
                         ids=["llama-every-block", "qwen2-every-block", "llama-top1"])
def test_cached_and_recomputed_trunks_train_the_same_model(tmp_path, task, kind, top_layers):
    """The llama tokenizer pads on the left and has no pad token, the qwen2 one pads right with eos."""
    base = save_tiny_decoder(tmp_path / "base", kind)
    runs, cfgs = {}, {}
    for policy in ("cached", "recompute"):
        cfgs[policy] = _config(tmp_path, base, task, policy, top_layers=top_layers, trunk_cache=policy)
        runs[policy] = train_locally(cfgs[policy])
    cached, recomputed = (_trunk_info(cfgs[p]) for p in ("cached", "recompute"))
    assert cached["policy"] == "cached" and cached["shards"] > 3 and cached["bytes"] == cached["estimate_bytes"]
    assert recomputed["policy"] == "recompute" and "shards" not in recomputed
    assert not list(Path(cfgs["recompute"].platform.storage_uri, "stages", "trunk").rglob("*.safetensors"))

    test = split_samples(load_data(cfgs["cached"])[0], cfgs["cached"].data.splits)["test"]
    bundles = {p: load_bundle(r.bundle_uri) for p, r in runs.items()}
    scores = {p: [x.reward for row in b.model.score_samples(test) for x in row] for p, b in bundles.items()}
    base_scores = {p: [x for row in b.baseline.score_samples(test) for x in row] for p, b in bundles.items()}
    torch.testing.assert_close(torch.tensor(scores["cached"]), torch.tensor(scores["recompute"]), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(base_scores["cached"]), torch.tensor(base_scores["recompute"]),
                               atol=1e-5, rtol=0)
    assert len(set(scores["cached"])) > len(test)  # rewards differ between responses: the model learnt something
    assert runs["cached"].report["dmoerm"] == runs["recompute"].report["dmoerm"]
    assert runs["cached"].report["dmoerm"]["overall"]["accuracy"] >= 0.8


def test_recomputed_trunk_collates_what_a_cache_holds():
    bb = decoder_backbone("llama", top_layers=1)
    samples = pairwise_samples(6)
    cache = TrunkCache(bb, batch_size=4)
    cache.add_samples(samples, progress=False)
    again = RecomputedTrunk(bb).add_samples(samples + samples[:2])
    assert len(again) == len(cache) == 12 and again.lengths() == cache.lengths()
    rows = [again.row(s.context, r) for s in samples[::-1] for r in s.responses]
    hidden, mask = again.collate(rows)
    expected, expected_mask = cache.collate([cache.row(s.context, r) for s in samples[::-1] for r in s.responses])
    assert torch.equal(mask, expected_mask)
    torch.testing.assert_close(hidden, expected, atol=1e-6, rtol=0)  # zeros past each row, like a cache


def _stages(cfg: PipelineConfig, store: StageStore) -> tuple[str, str]:
    route = route_step(cfg, store, data_step(cfg, store))
    return route, label_step(cfg, store, route)


def test_auto_recomputes_a_cache_bigger_than_its_budget(tmp_path, task, caplog):
    base = save_tiny_decoder(tmp_path / "base", "qwen2")
    small = _config(tmp_path, base, task, "small", top_layers=1, trunk_cache_budget_gb=1e-6)
    store = StageStore(small.platform.storage_uri)
    route, labels = _stages(small, store)
    with caplog.at_level(logging.INFO, logger="dmoerm.stages.train"):
        over = trunk_step(small, store, route, labels)
    info = store.done("trunk", over)
    assert info["policy"] == "recompute" and info["estimate_bytes"] > 1e3 and info["budget_gb"] == 1e-6
    assert "> model.trunk_cache_budget_gb" in info["reason"] and info["mode"] == "auto"
    assert any("trunk features:" in r.message and "recompute" in r.message for r in caplog.records)
    assert not (Path(store.local("trunk", over)) / "index.json").exists()

    roomy = _config(tmp_path, base, task, "small", top_layers=1, trunk_cache_budget_gb=1.0)
    fits = trunk_step(roomy, store, route, labels)
    info = store.done("trunk", fits)
    assert fits != over and info["policy"] == "cached" and info["shards"] >= 1
    assert info["estimate_bytes"] == info["bytes"]  # every row's tokens were counted: the estimate is exact here
    # the paper's split: the trunk is the embeddings, auto recomputes them whatever the budget
    every = _config(tmp_path, base, task, "small", top_layers=NUM_LAYERS, trunk_cache_budget_gb=1.0)
    route_all, labels_all = _stages(every, store)
    info = store.done("trunk", trunk_step(every, store, route_all, labels_all))
    assert info["policy"] == "recompute" and "embeddings" in info["reason"]
    # what each phase then gets
    samples = store.get_samples("route", route, "phase1.jsonl")[:3]
    assert isinstance(trunk_cache(small, store, over, samples), RecomputedTrunk)
    assert isinstance(trunk_cache(roomy, store, fits, samples), CachedTrunk)


def test_cached_trunk_streams_its_shards_and_trains_as_the_in_memory_cache(tmp_path):
    bb = decoder_backbone("llama", top_layers=1)
    train, val = pairwise_samples(24), pairwise_samples(6, offset=100)
    writer = TrunkShardWriter(bb, tmp_path, shard_bytes=20_000, batch_size=8)
    writer.add_samples(train, progress=False)
    writer.add_samples(val, progress=False)
    summary = writer.close()
    assert summary["rows"] == 60 and summary["shards"] >= 6
    assert writer.peak_buffer_bytes < 20_000 + 8 * 48 * 32 * 4  # one shard plus one row at most, never every row

    streamed = CachedTrunk(tmp_path, max_open_shards=2)
    memory = TrunkCache(bb, batch_size=8)
    memory.add_samples(train, progress=False)  # the same trunk batches as the writer's: the same floats
    memory.add_samples(val, progress=False)
    settings = TrainConfig(lr=1e-2, epochs=2, batch_size=8, patience=5, warmup_ratio=0.0)
    top_a, res_a = train_top(bb, streamed, train, val, settings, seed=3, hooks=None)
    top_b, res_b = train_top(bb, memory, train, val, settings, seed=3, hooks=None)
    for (name, a), b in zip(top_a.state_dict().items(), top_b.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
    assert res_a.history == res_b.history
    stats = streamed.stats
    assert stats.max_open <= 2 and len(stats.shards_fetched) == summary["shards"]
    one_batch = 10 * 48 * 32 * 4  # batch_size 8 rows of whole samples (+1 sample), max_length 48, H=32, float32
    assert stats.max_batch_bytes <= one_batch < summary["bytes"]
    assert not any(isinstance(v, torch.Tensor) for v in vars(streamed).values())


def test_a_missing_row_names_the_cache(tmp_path):
    bb = decoder_backbone("qwen2", top_layers=1)
    writer = TrunkShardWriter(bb, tmp_path)
    writer.add_samples(pairwise_samples(2), progress=False)
    writer.close()
    other = pairwise_samples(1, offset=50)[0]
    with pytest.raises(KeyError, match="index.json lacks 2 of the 2 rows"):
        CachedTrunk(tmp_path, [row_key(c, r) for c, r in sample_rows([other])])


@pytest.mark.integration
def test_on_s3_a_batch_downloads_only_its_shards(tmp_path, task, s3_server):
    bucket = s3_server.create_bucket("trunk-policy")
    base = save_tiny_decoder(tmp_path / "base", "llama")
    cfg = _config(tmp_path, base, task, "s3", storage=f"s3://{bucket}/run", top_layers=1, trunk_cache="cached",
                  trunk_shard_mb=0.01)
    writer_store = StageStore(cfg.platform.storage_uri, local_cache=str(tmp_path / "writer"))
    route, labels = _stages(cfg, writer_store)
    key = trunk_step(cfg, writer_store, route, labels)
    num_shards = writer_store.done("trunk", key)["shards"]
    assert num_shards >= 8

    reader = StageStore(cfg.platform.storage_uri, local_cache=str(tmp_path / "reader"))
    samples = reader.get_samples("route", route, "phase3.jsonl")
    cache = trunk_cache(cfg, reader, key, samples)
    local = Path(reader.local("trunk", key))
    assert not list(local.rglob("*.safetensors"))  # the index only, until a batch asks

    index = json.loads((local / "index.json").read_text())
    picked = [(samples[0].context, samples[0].responses[0]), (samples[-1].context, samples[-1].responses[-1])]
    hidden, mask = cache.collate([cache.row(c, r) for c, r in picked])
    needed = {index["shards"][index["rows"][row_key(c, r)][0]] for c, r in picked}
    fetched = {p.relative_to(local).as_posix() for p in local.rglob("*.safetensors")}
    assert fetched == needed and len(fetched) < num_shards
    writer_local = Path(writer_store.local("trunk", key))
    for i, (c, r) in enumerate(picked):
        n = int(mask[i].sum())
        expected = CachedTrunk(writer_local, [row_key(c, r)]).tensor(0)
        torch.testing.assert_close(hidden[i, :n], expected, atol=0, rtol=0)
