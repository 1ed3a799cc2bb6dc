"""One precision policy: the trunk features every phase trains on are the states scoring computes, on a
default config (the Ray path used to store them in float16 while scoring ran in float32)."""

from __future__ import annotations

import pytest
import torch
from pipeline_fixtures import write_config, write_task

from dmoerm.config import load_config
from dmoerm.pipeline import open_store
from dmoerm.stages.base import backbone_for
from dmoerm.stages.data import data_step, splits_of
from dmoerm.stages.labels import label_step
from dmoerm.stages.route import route_step
from dmoerm.stages.train import trunk_cache, trunk_step


def test_cached_trunk_features_are_the_scoring_states(tmp_path, tiny_bert_dir):
    cfg = load_config(write_config(tmp_path, tiny_bert_dir, write_task(tmp_path, n=40), str(tmp_path / "s"), None))
    assert cfg.model.precision == "float32"
    store = open_store(cfg)
    route = route_step(cfg, store, data_step(cfg, store))
    trunk = trunk_step(cfg, store, route, label_step(cfg, store, route))
    samples = splits_of(store, "route", route)["phase1"][:6]
    cache = trunk_cache(cfg, store, trunk, samples)
    bb = backbone_for(cfg)
    contexts = [s.context for s in samples for _ in s.responses]
    responses = [r for s in samples for r in s.responses]
    enc = bb.encode(contexts, responses)
    with torch.no_grad():
        scored = bb.trunk(enc)  # (B, T, H): what the scorer feeds the top blocks
    for b, (ctx, resp) in enumerate(zip(contexts, responses)):
        cached = cache.rows[cache.row(ctx, resp)]  # (T_b, H)
        assert cached.dtype == torch.float32
        n = int(enc.attention_mask[b].sum())
        assert cached.shape[0] == n
        torch.testing.assert_close(cached, scored[b, :n], atol=1e-5, rtol=1e-5)


def test_a_second_precision_is_refused_by_the_config():
    with pytest.raises(ValueError, match="precision"):
        load_config(data={"taxonomy": [{"name": "a", "capabilities": ["x"]}], "model": {"precision": "float16"}})
