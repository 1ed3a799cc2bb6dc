"""Stages ``features`` and ``aggregator``: every frozen expert's pooled hidden state of a category's
phase-3 and validation rows, computed once; the final aggregator on them, with the searched settings
(``dmoerm.stages.search``) or, with ``platform.tune.enabled`` false, ``cfg.aggregator`` trained with
``cfg.phase3`` (both executors then build the same bundle).
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from safetensors.torch import load_file

from dmoerm.bundle import save_tensors
from dmoerm.config import PipelineConfig
from dmoerm.configtools import to_dict
from dmoerm.modeling.aggregator import Aggregator, AggregatorConfig
from dmoerm.stages.base import backbone_for, device_for
from dmoerm.stages.data import splits_of
from dmoerm.stages.search import trial_settings
from dmoerm.stages.store import StageStore
from dmoerm.stages.train import load_experts, trunk_cache
from dmoerm.training.loop import FitHooks, Group, TrainConfig
from dmoerm.training.phases import phase3_features, train_aggregator

logger = logging.getLogger(__name__)
Features = tuple[torch.Tensor, dict[str, list[Group]]]


# ---- expert features -------------------------------------------------------------------------------
def features_step(cfg: PipelineConfig, store: StageStore, route_key: str, trunk_key: str, phase1_key: str,
                  expert_keys: dict[str, str], category: str) -> str:
    key = store.key(route=route_key, trunk=trunk_key, phase1=phase1_key, experts=expert_keys, category=category)
    if store.done("features", key) is None:
        splits = splits_of(store, "route", route_key, category)
        cache = trunk_cache(cfg, store, trunk_key, splits["phase3"] + splits["val"])
        caps = cfg.category(category).capabilities
        experts = load_experts(cfg, store, phase1_key, expert_keys, category)
        feats, tg, vg = phase3_features(experts, caps, backbone_for(cfg), cache, splits["phase3"], splits["val"],
                                        cfg.model.feature_batch_size, progress=False)  # (R, K, H)
        save_tensors({"features": feats}, store.local("features", key) / "features.safetensors")
        store.put_json("features", key, "groups.json",
                       {n: [{"rows": g.rows, "pairs": g.pairs} for g in gs] for n, gs in (("phase3", tg), ("val", vg))})
        store.mark_done("features", key, {"rows": feats.size(0), "experts": len(caps)})
    return key


def load_features(store: StageStore, key: str) -> Features:
    """(features (R, K, H), {"phase3": [Group], "val": [Group]})."""
    feats = load_file(str(store.path("features", key, "features.safetensors")))["features"]
    raw = store.get_json("features", key, "groups.json")
    return feats, {n: [Group(g["rows"], [tuple(p) for p in g["pairs"]]) for g in gs] for n, gs in raw.items()}


# ---- the final aggregator ----------------------------------------------------------------------------
def aggregator_choice(cfg: PipelineConfig, store: StageStore, search_key: str | None
                      ) -> tuple[AggregatorConfig, TrainConfig]:
    """The config's aggregator and phase-3 settings, or the searched ones (trained ``tune.max_epochs`` with
    phase 3's patience)."""
    if search_key is None:
        return cfg.aggregator, cfg.phase3
    best = store.get_json("search", search_key, "best.json")
    spec, settings = trial_settings(best["config"], cfg.phase3, cfg.platform.tune.max_epochs)
    return spec, dataclasses.replace(settings, patience=cfg.phase3.patience)


def aggregator_step(cfg: PipelineConfig, store: StageStore, features_key: str, search_key: str | None) -> str:
    spec, settings = aggregator_choice(cfg, store, search_key)
    key = store.key(features=features_key, spec=spec, settings=settings, seed=cfg.seed)
    if store.done("aggregator", key) is None:
        feats, groups = load_features(store, features_key)
        agg, result = train_aggregator(feats, groups["phase3"], groups["val"], spec, settings, seed=cfg.seed,
                                       hooks=FitHooks(progress=False), device=device_for(cfg))
        save_tensors(agg.state_dict(), store.local("aggregator", key) / "aggregator.safetensors")
        store.put_json("aggregator", key, "spec.json", to_dict(spec))
        store.mark_done("aggregator", key, {"val_accuracy": result.best_val_accuracy, "steps": result.steps})
    return key


def load_aggregator(store: StageStore, key: str, num_experts: int, hidden: int) -> Aggregator:
    agg = Aggregator(num_experts, hidden, aggregator_spec(store, key))
    agg.load_state_dict(load_file(str(store.path("aggregator", key, "aggregator.safetensors"))))
    return agg.eval()


def aggregator_spec(store: StageStore, key: str) -> AggregatorConfig:
    return AggregatorConfig(**store.get_json("aggregator", key, "spec.json"))
