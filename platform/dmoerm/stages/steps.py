"""The pipeline's stages: data -> route -> labels -> trunk features -> phase 1 -> phase 2 experts ->
expert features -> aggregator -> baseline -> evaluate (bundle). Each returns its key; a finished stage
(same config slice, same inputs) is skipped. The Ray job decides where each one runs.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from safetensors.torch import load_file
from torch import nn

from dmoerm.bundle import save_tensors
from dmoerm.config import PipelineConfig
from dmoerm.configtools import to_dict
from dmoerm.data.records import Sample
from dmoerm.data.splits import split_samples
from dmoerm.modeling.aggregator import Aggregator, AggregatorSpec
from dmoerm.modeling.backbone import Backbone
from dmoerm.modeling.reward_model import CategoryModel, RewardModel, SingleRewardModel
from dmoerm.modeling.router import RouterHead
from dmoerm.modeling.top import TopStack, attach_experts, owned_by
from dmoerm.stages.store import StageStore, fingerprint_uri
from dmoerm.training.features import TrunkCache, load_trunk_cache, save_trunk_cache
from dmoerm.training.loop import FitResult, TrainSettings

logger = logging.getLogger(__name__)
SPLITS = ("phase1", "phase3", "val", "test")
MetricFn = Callable[[str, float, int], None]


@functools.lru_cache(maxsize=2)
def _backbone(base: str, top_layers: int, pooling: str, max_length: int, revision: str | None,
              trust_remote_code: bool) -> Backbone:
    from dmoerm.modeling.backbone import load_backbone

    return load_backbone(base, top_layers=top_layers, pooling=pooling, max_length=max_length, revision=revision,
                         trust_remote_code=trust_remote_code)


def backbone_for(cfg: PipelineConfig) -> Backbone:
    m = cfg.model
    return _backbone(m.base, m.top_layers, m.pooling, m.max_length, m.revision, m.trust_remote_code)


def _model_id(cfg: PipelineConfig) -> dict:
    m = cfg.model
    return {"base": m.base, "revision": m.revision, "top_layers": m.top_layers, "pooling": m.pooling,
            "max_length": m.max_length}


# ---- data, router, labels ---------------------------------------------------------------------
def data_step(cfg: PipelineConfig, store: StageStore) -> str:
    from dmoerm.pipeline import load_data

    files = {s.path: fingerprint_uri(s.path) for s in cfg.data.sources}
    key = store.key(data=cfg.data, seed=cfg.seed, files=files)
    if store.done("data", key) is None:
        samples, report = load_data(cfg)
        for name, part in split_samples(samples, cfg.data.splits).items():
            store.put_samples("data", key, f"{name}.jsonl", part)
        store.mark_done("data", key, report)
    return key


def splits_of(store: StageStore, stage: str, key: str) -> dict[str, list[Sample]]:
    return {name: store.get_samples(stage, key, f"{name}.jsonl") for name in SPLITS}


def route_step(cfg: PipelineConfig, store: StageStore, data_key: str, log_metric: MetricFn | None = None) -> str:
    """Train the router on known categories; give every uncategorised sample the routed one."""
    from dmoerm.pipeline import assign_categories, train_router_stage

    key = store.key(data=data_key, model=_model_id(cfg), router=cfg.router, taxonomy=cfg.taxonomy, seed=cfg.seed)
    if store.done("route", key) is None:
        bb = backbone_for(cfg)
        splits = splits_of(store, "data", data_key)
        router, metrics = train_router_stage(bb, splits, cfg, log_metric)
        assigned = {n: assign_categories(bb, router, splits[n], cfg.model.feature_batch_size) for n in SPLITS[:3]}
        for name, part in splits.items():
            store.put_samples("route", key, f"{name}.jsonl", part)
        save_tensors(router.state_dict(), store.local("route", key) / "router.safetensors")
        store.mark_done("route", key, {**metrics, "assigned": assigned})
    return key


def load_router(cfg: PipelineConfig, store: StageStore, route_key: str) -> RouterHead:
    bb = backbone_for(cfg)
    head = RouterHead(bb.hidden_size, [c.name for c in cfg.taxonomy], width=cfg.router.width,
                      inputs=cfg.router.resolve(bb))
    head.load_state_dict(load_file(str(store.path("route", route_key, "router.safetensors"))))
    return head.eval()


def label_step(cfg: PipelineConfig, store: StageStore, route_key: str,
               labeler: Callable | None = None) -> str:
    """Capability labels per (category, capability). ``labeler`` replaces the in-process judge call (the
    Ray job passes one that spreads the questions over workers under one global concurrency limit)."""
    from dmoerm.pipeline import label_stage

    label_cfg = to_dict(cfg.labels)
    if cfg.labels.judge is not None:  # the cache location does not change the labels
        label_cfg["judge"].pop("cache_path", None)
        label_cfg["judge"].pop("concurrency", None)
    files = {s.path: fingerprint_uri(s.path) for v in cfg.labels.datasets.values() for s in v}
    key = store.key(route=route_key, labels=label_cfg, files=files, taxonomy=cfg.taxonomy, seed=cfg.seed)
    if store.done("labels", key) is None:
        caps = label_stage(cfg, splits_of(store, "route", route_key), labeler=labeler)
        index = []
        for (cat, cap), train in caps.train.items():
            for part, samples in (("train", train), ("val", caps.val[(cat, cap)])):
                name = f"{cat}.{cap}.{part}.jsonl"
                store.put_samples("labels", key, name, samples)
                index.append({"category": cat, "capability": cap, "part": part, "file": name, "n": len(samples)})
        store.put_json("labels", key, "index.json", index)
        store.mark_done("labels", key, caps.report)
    return key


def capability_samples(store: StageStore, label_key: str, category: str, capability: str, part: str) -> list[Sample]:
    return store.get_samples("labels", label_key, f"{category}.{capability}.{part}.jsonl")


# ---- trunk features -------------------------------------------------------------------------------
def trunk_step(cfg: PipelineConfig, store: StageStore, route_key: str, label_key: str) -> str:
    """The frozen trunk's hidden states of every training row, computed once for all later stages."""
    key = store.key(route=route_key, labels=label_key, model=_model_id(cfg), dtype=cfg.platform.feature_dtype)
    if store.done("trunk", key) is None:
        bb = backbone_for(cfg)
        splits = splits_of(store, "route", route_key)
        cache = TrunkCache(bb, batch_size=cfg.model.feature_batch_size)
        rows = splits["phase1"] + splits["phase3"] + splits["val"]
        for entry in store.get_json("labels", label_key, "index.json"):
            rows += store.get_samples("labels", label_key, entry["file"])
        cache.add_samples(rows)
        save_trunk_cache(cache, str(store.local("trunk", key) / "trunk.safetensors"),
                         getattr(torch, cfg.platform.feature_dtype))
        store.mark_done("trunk", key, {"rows": len(cache)})
    return key


def trunk_cache(cfg: PipelineConfig, store: StageStore, trunk_key: str, samples: list[Sample]) -> TrunkCache:
    from dmoerm.training.features import row_key

    keys = [row_key(s.context, r) for s in samples for r in s.responses]
    return load_trunk_cache(backbone_for(cfg), str(store.path("trunk", trunk_key, "trunk.safetensors")), keys)


# ---- phase 1 and the baseline --------------------------------------------------------------------
def _ckpt_hooks(store: StageStore, stage: str, key: str):
    from dmoerm.checkpoint import load_state, save_state

    ckpt = store.local(stage, key) / "checkpoint"
    resume = load_state(ckpt) if (ckpt / "state.json").exists() else None
    return (lambda state: save_state(ckpt, state)), resume


def top_step(cfg: PipelineConfig, store: StageStore, route_key: str, trunk_key: str, category: str | None,
             log_metric: MetricFn | None = None) -> str:
    """Phase 1 for ``category``, or the single-RM baseline on all categories when ``category`` is None."""
    from dmoerm.training.phases import train_top

    stage = "phase1" if category else "baseline"
    key = store.key(route=route_key, trunk=trunk_key, category=category, settings=cfg.phase1, seed=cfg.seed)
    if store.done(stage, key) is None:
        splits = splits_of(store, "route", route_key)
        if category:
            splits = {k: [s for s in v if s.category == category] for k, v in splits.items()}
            train = splits["phase1"]
        else:
            train = splits["phase1"] + splits["phase3"]
        cache = trunk_cache(cfg, store, trunk_key, train + splits["val"])
        save_ckpt, resume = _ckpt_hooks(store, stage, key)
        top, result = train_top(backbone_for(cfg), cache, train, splits["val"], cfg.phase1, seed=cfg.seed,
                                desc=f"{category}/phase1" if category else "baseline", log_metric=log_metric,
                                checkpoint=save_ckpt, resume=resume, progress=False)
        save_tensors(top.state_dict(), store.local(stage, key) / "top.safetensors")
        store.mark_done(stage, key, {"val_accuracy": result.best_val_accuracy, "steps": result.steps})
    return key


def load_top(cfg: PipelineConfig, store: StageStore, stage: str, key: str) -> TopStack:
    top = TopStack(backbone_for(cfg))
    top.load_state_dict(load_file(str(store.path(stage, key, "top.safetensors"))))
    return top


# ---- phase 2: one expert ----------------------------------------------------------------------------
@dataclass
class ExpertInputs:
    """Everything that identifies one capability expert's training."""

    route: str
    labels: str
    trunk: str
    phase1: str
    category: str
    capability: str


def expert_key(cfg: PipelineConfig, store: StageStore, inputs: ExpertInputs) -> str:
    return store.key(inputs=inputs, settings=cfg.phase2, lora=cfg.model.lora, seed=cfg.seed)


def adapter_tensors(experts: nn.Module, capability: str) -> dict[str, torch.Tensor]:
    """The parameters owned by one expert: its LoRA matrices and its value-head copy."""
    mine = {k: v for k, v in experts.state_dict().items() if owned_by(k, capability)}
    if not mine:
        raise ValueError(f"no parameters found for expert {capability!r}")
    return mine


def train_expert_step(cfg: PipelineConfig, store: StageStore, inputs: ExpertInputs, *, shard: tuple[int, int] = (0, 1),
                      wrap: Callable[[nn.Module], nn.Module] | None = None, resume: dict | None = None,
                      checkpoint: Callable[[dict], None] | None = None, log_metric: MetricFn | None = None
                      ) -> tuple[dict[str, torch.Tensor], FitResult]:
    """Train one capability expert (one data-parallel worker's share when ``shard`` is given); returns
    the expert's own tensors. ``wrap`` wraps the model for data parallelism (e.g. DDP)."""
    from dmoerm.training.phases import capability_groups, train_expert

    spec = next(c for c in cfg.taxonomy if c.name == inputs.category)
    train = capability_samples(store, inputs.labels, inputs.category, inputs.capability, "train")
    val = capability_samples(store, inputs.labels, inputs.category, inputs.capability, "val")
    cache = trunk_cache(cfg, store, inputs.trunk, train + val)
    experts = attach_experts(load_top(cfg, store, "phase1", inputs.phase1), spec.capabilities, cfg.model.lora)
    result = train_expert(experts, inputs.capability, backbone_for(cfg), cache,
                          capability_groups(train, inputs.capability, cache),
                          capability_groups(val, inputs.capability, cache), cfg.phase2, seed=cfg.seed,
                          desc=f"{inputs.category}/expert/{inputs.capability}", log_metric=log_metric, wrap=wrap,
                          checkpoint=checkpoint, resume=resume, progress=False, shard=shard)
    return adapter_tensors(experts, inputs.capability), result


def save_expert(store: StageStore, key: str, tensors: dict[str, torch.Tensor], info: dict) -> None:
    save_tensors(tensors, store.local("experts", key) / "adapter.safetensors")
    store.mark_done("experts", key, info)


def load_experts(cfg: PipelineConfig, store: StageStore, phase1_key: str, expert_keys: dict[str, str],
                 category: str) -> nn.Module:
    """The category's TopStack with every trained adapter loaded (strict: every adapter key present)."""
    spec = next(c for c in cfg.taxonomy if c.name == category)
    experts = attach_experts(load_top(cfg, store, "phase1", phase1_key), spec.capabilities, cfg.model.lora)
    state = experts.state_dict()
    for cap in spec.capabilities:
        tensors = load_file(str(store.path("experts", expert_keys[cap], "adapter.safetensors")))
        missing = set(adapter_tensors(experts, cap)) - set(tensors)
        if missing:
            raise ValueError(f"expert {category}/{cap}: adapter file lacks {sorted(missing)[:3]}")
        state.update(tensors)
    experts.load_state_dict(state)
    return experts.eval()


# ---- phase 3 -------------------------------------------------------------------------------------
def features_step(cfg: PipelineConfig, store: StageStore, route_key: str, trunk_key: str, phase1_key: str,
                  expert_keys: dict[str, str], category: str) -> str:
    """Every frozen expert's pooled hidden state for the category's phase-3 and validation rows."""
    from dmoerm.training.phases import phase3_features

    key = store.key(route=route_key, trunk=trunk_key, phase1=phase1_key, experts=expert_keys, category=category)
    if store.done("features", key) is None:
        splits = {k: [s for s in v if s.category == category] for k, v in splits_of(store, "route", route_key).items()}
        cache = trunk_cache(cfg, store, trunk_key, splits["phase3"] + splits["val"])
        spec = next(c for c in cfg.taxonomy if c.name == category)
        experts = load_experts(cfg, store, phase1_key, expert_keys, category)
        feats, tg, vg = phase3_features(experts, spec.capabilities, backbone_for(cfg), cache, splits["phase3"],
                                        splits["val"], cfg.model.feature_batch_size, progress=False)  # (R, K, H)
        save_tensors({"features": feats}, store.local("features", key) / "features.safetensors")
        store.put_json("features", key, "groups.json",
                       {n: [{"rows": g.rows, "pairs": g.pairs} for g in gs] for n, gs in (("phase3", tg), ("val", vg))})
        store.mark_done("features", key, {"rows": feats.size(0), "experts": len(spec.capabilities)})
    return key


def load_features(store: StageStore, key: str):
    """(features (R, K, H), {"phase3": [Group], "val": [Group]})."""
    from dmoerm.training.loop import Group

    feats = load_file(str(store.path("features", key, "features.safetensors")))["features"]
    raw = store.get_json("features", key, "groups.json")
    return feats, {n: [Group(g["rows"], [tuple(p) for p in g["pairs"]]) for g in gs] for n, gs in raw.items()}


def aggregator_step(cfg: PipelineConfig, store: StageStore, features_key: str, spec: AggregatorSpec,
                    settings: TrainSettings, log_metric: MetricFn | None = None) -> str:
    from dmoerm.training.phases import train_aggregator

    key = store.key(features=features_key, spec=spec, settings=settings, seed=cfg.seed)
    if store.done("aggregator", key) is None:
        feats, groups = load_features(store, features_key)
        agg, result = train_aggregator(feats, groups["phase3"], groups["val"], spec, settings, seed=cfg.seed,
                                       log_metric=log_metric, progress=False)
        save_tensors(agg.state_dict(), store.local("aggregator", key) / "aggregator.safetensors")
        store.put_json("aggregator", key, "spec.json", to_dict(spec))
        store.mark_done("aggregator", key, {"val_accuracy": result.best_val_accuracy, "steps": result.steps})
    return key


def load_aggregator(store: StageStore, key: str, num_experts: int, hidden: int) -> Aggregator:
    spec = AggregatorSpec(**store.get_json("aggregator", key, "spec.json"))
    agg = Aggregator(num_experts, hidden, spec)
    agg.load_state_dict(load_file(str(store.path("aggregator", key, "aggregator.safetensors"))))
    return agg.eval()


# ---- evaluate and bundle --------------------------------------------------------------------------
@dataclass
class CategoryKeys:
    phase1: str
    experts: dict[str, str]
    aggregator: str


def evaluate_step(cfg: PipelineConfig, store: StageStore, route_key: str, categories: dict[str, CategoryKeys],
                  baseline_key: str | None) -> str:
    """Compose the model, evaluate it and the baseline on the test split, write the bundle."""
    from dmoerm.bundle import save_bundle
    from dmoerm.evaluation import evaluate

    key = store.key(route=route_key, categories=categories, baseline=baseline_key)
    if store.done("evaluate", key) is None:
        bb = backbone_for(cfg)
        cats = {}
        for spec in cfg.taxonomy:
            k = categories[spec.name]
            agg = load_aggregator(store, k.aggregator, len(spec.capabilities), bb.hidden_size)
            cats[spec.name] = CategoryModel(spec.name, list(spec.capabilities),
                                            load_experts(cfg, store, k.phase1, k.experts, spec.name), agg)
        model = RewardModel(bb, load_router(cfg, store, route_key), cats, batch_size=cfg.model.feature_batch_size)
        base_top = load_top(cfg, store, "baseline", baseline_key) if baseline_key else None
        baseline = SingleRewardModel(bb, base_top, cfg.model.feature_batch_size) if base_top is not None else None
        test = store.get_samples("route", route_key, "test.jsonl")
        report = evaluate(model, test, baseline)
        agg_spec = AggregatorSpec(**store.get_json("aggregator", categories[cfg.taxonomy[0].name].aggregator,
                                                   "spec.json"))
        save_bundle(store.local("evaluate", key) / "bundle", model, lora=cfg.model.lora, aggregator=agg_spec,
                    router_width=cfg.router.width, baseline=base_top, metrics=report.metrics(),
                    extra={"name": cfg.name})
        store.put_json("evaluate", key, "report.json", {"metrics": report.metrics(), "dmoerm": report.dmoerm,
                                                        "baseline": report.baseline, "table": report.table(),
                                                        "confusion": report.confusion,
                                                        "categories": report.categories})
        store.put_json("evaluate", key, "pair_outcomes.json", {k: list(v) for k, v in report.outcomes.items()})
        if report.baseline_outcomes is not None:
            store.put_json("evaluate", key, "baseline_pair_outcomes.json",
                           {k: list(v) for k, v in report.baseline_outcomes.items()})
        store.mark_done("evaluate", key, {"metrics": report.metrics()})
    return key
