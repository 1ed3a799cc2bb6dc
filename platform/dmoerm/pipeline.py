"""The DMoERM recipe end to end, in one process: data -> router -> labels -> phases 1-3 -> evaluate ->
bundle. Each stage is a plain function of explicit inputs, so the Ray jobs compose the same stages.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from dmoerm.config import PipelineConfig
from dmoerm.data.loaders import load_source
from dmoerm.data.records import Sample
from dmoerm.data.splits import split_samples
from dmoerm.evaluation import EvalReport, evaluate
from dmoerm.modeling.backbone import Backbone, load_backbone
from dmoerm.modeling.reward_model import CategoryModel, RewardModel, SingleRewardModel
from dmoerm.modeling.router import RouterHead, context_features
from dmoerm.modeling.top import attach_experts
from dmoerm.training.features import TrunkCache
from dmoerm.training.phases import (
    capability_groups,
    phase3_features,
    train_aggregator,
    train_expert,
    train_router,
    train_top,
)

logger = logging.getLogger(__name__)
MetricFn = Callable[[str, float, int], None]


def _hash_order(seed: int, key: str) -> str:
    return hashlib.sha1(f"{seed}:{key}".encode()).hexdigest()


def subsample(samples: list[Sample], limit: int | None, seed: int) -> list[Sample]:
    """A seeded, order-independent subsample of at most ``limit`` samples."""
    if limit is None or len(samples) <= limit:
        return samples
    return sorted(samples, key=lambda s: _hash_order(seed, s.id))[:limit]


def load_backbone_for(cfg: PipelineConfig) -> Backbone:
    m = cfg.model
    return load_backbone(m.base, top_layers=m.top_layers, pooling=m.pooling, max_length=m.max_length,
                         revision=m.revision, trust_remote_code=m.trust_remote_code)


# ---- stage: data ------------------------------------------------------------------------------
def load_data(cfg: PipelineConfig) -> tuple[list[Sample], dict]:
    """Load every source (skips reported, never silent) and subsample per category."""
    samples, report = [], {"sources": []}
    for src in cfg.data.sources:
        res = load_source(src)
        logger.info(res.summary())
        report["sources"].append({"path": src.path, "loaded": len(res.samples), "skipped": len(res.skipped),
                                  "summary": res.summary()})
        samples.extend(res.samples)
    by_cat: dict[str | None, list[Sample]] = {}
    for s in samples:
        by_cat.setdefault(s.category, []).append(s)
    kept = []
    for cat in sorted(by_cat, key=str):
        kept.extend(subsample(by_cat[cat], cfg.data.max_samples_per_category, cfg.seed))
    report["samples"] = len(kept)
    return kept, report


# ---- stage: router ----------------------------------------------------------------------------
def train_router_stage(backbone: Backbone, splits: dict[str, list[Sample]], cfg: PipelineConfig,
                       log_metric: MetricFn | None = None) -> tuple[RouterHead, dict]:
    """The router on the contexts of samples with a known category; its features are ``context_features``
    with ``cfg.router``'s input settings, which the head records for scoring."""
    names = [c.name for c in cfg.taxonomy]
    idx = {n: i for i, n in enumerate(names)}
    bs = cfg.model.feature_batch_size
    inputs = cfg.router.resolve(backbone)

    def feats(samples: Sequence[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
        known = [s for s in samples if s.category is not None]
        x = (context_features(backbone, [s.context for s in known], inputs, batch_size=bs) if known
             else torch.zeros(0, 1))
        return x, torch.tensor([idx[s.category] for s in known], dtype=torch.long)

    x, y = feats(splits["phase1"] + splits["phase3"])
    vx, vy = feats(splits["val"])
    if len(y) == 0 and len(names) > 1:
        raise ValueError("no sample has a known category: give at least one data source a `category`")
    return train_router(x, y, vx, vy, names, cfg.router.train, width=cfg.router.width, seed=cfg.seed,
                        log_metric=log_metric, inputs=inputs)


@torch.no_grad()
def assign_categories(backbone: Backbone, router: RouterHead, samples: list[Sample], batch_size: int = 32) -> int:
    """Give the router's category to every sample without one; returns how many were assigned."""
    todo = [s for s in samples if s.category is None]
    if todo:
        feats = context_features(backbone, [s.context for s in todo], router.inputs, batch_size=batch_size)
        pred = router(feats).argmax(-1)  # (N,)
        for s, p in zip(todo, pred.tolist()):
            s.category = router.categories[p]
    return len(todo)


# ---- stage: capability labels -----------------------------------------------------------------
@dataclass
class CapabilityData:
    """Per (category, capability): labelled samples for the expert's training and early stopping."""

    train: dict[tuple[str, str], list[Sample]] = field(default_factory=dict)
    val: dict[tuple[str, str], list[Sample]] = field(default_factory=dict)
    report: dict = field(default_factory=dict)


def _split_by_prompt(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    val_keys = {k for k in {s.prompt_key for s in samples}
                if int(_hash_order(seed, "val:" + k)[:8], 16) / 0xFFFFFFFF < fraction}
    return [s for s in samples if s.prompt_key not in val_keys], [s for s in samples if s.prompt_key in val_keys]


def label_stage(cfg: PipelineConfig, splits: dict[str, list[Sample]], labeler: Callable | None = None
                ) -> CapabilityData:
    """Capability labels for every expert. No prompt of phase 3, validation or test ever trains one."""
    from dmoerm.labeling import (
        label_samples,
        labels_from_attributes,
        labels_from_dataset,
        load_attribute_ratings,
    )

    out = CapabilityData()
    held_out = {s.prompt_key for name in ("phase3", "val", "test") for s in splits[name]}
    frac, seed = cfg.labels.expert_val_fraction, cfg.seed
    if cfg.labels.source == "dataset":
        for cap, sources in sorted(cfg.labels.datasets.items()):
            loaded = [s for src in sources for s in load_source(src).samples]
            clean = [s for s in loaded if s.prompt_key not in held_out]
            excluded = len(loaded) - len(clean)
            clean = subsample(clean, cfg.labels.max_samples_per_capability, seed)
            labels_from_dataset(clean, cap)
            train, val = _split_by_prompt(clean, frac, seed)
            out.report[cap] = {"loaded": len(loaded), "excluded_held_out_prompts": excluded, "train": len(train),
                               "val": len(val)}
            logger.info("capability %s: %s", cap, out.report[cap])
            for cat in cfg.taxonomy:
                if cap in cat.capabilities:
                    out.train[(cat.name, cap)], out.val[(cat.name, cap)] = train, val
        return out
    phase1 = splits["phase1"]
    if cfg.labels.source == "judge":
        report = (labeler or label_samples)(phase1, cfg.capabilities, cfg.labels.judge)
        out.report["judge"] = report.__dict__ if hasattr(report, "__dict__") else str(report)
    else:
        n = labels_from_attributes(phase1, load_attribute_ratings(cfg.labels.attributes_path))
        out.report["attributes"] = {"labelled_pairs": n}
    for cat in cfg.taxonomy:
        mine = [s for s in phase1 if s.category == cat.name]
        for cap in cat.capabilities:
            labelled = [s for s in mine if s.capability_prefs.get(cap)]
            out.train[(cat.name, cap)], out.val[(cat.name, cap)] = _split_by_prompt(labelled, frac, seed)
    return out


# ---- stages: phases 1-3 per category ------------------------------------------------------------
def train_category(backbone: Backbone, cache: TrunkCache, cfg: PipelineConfig, name: str,
                   splits: dict[str, list[Sample]], caps: CapabilityData, log_metric: MetricFn | None = None,
                   progress: bool = True) -> tuple[CategoryModel, dict]:
    spec = next(c for c in cfg.taxonomy if c.name == name)
    mine = {k: [s for s in v if s.category == name] for k, v in splits.items()}
    metrics: dict[str, float] = {}
    top, r1 = train_top(backbone, cache, mine["phase1"], mine["val"], cfg.phase1, seed=cfg.seed,
                        desc=f"{name}/phase1", log_metric=log_metric, progress=progress)
    metrics[f"{name}/phase1/val_accuracy"] = r1.best_val_accuracy
    experts = attach_experts(top, spec.capabilities, cfg.model.lora)
    for cap in spec.capabilities:
        train = capability_groups(caps.train[(name, cap)], cap, cache)
        val = capability_groups(caps.val[(name, cap)], cap, cache)
        r2 = train_expert(experts, cap, backbone, cache, train, val, cfg.phase2, seed=cfg.seed,
                          desc=f"{name}/expert/{cap}", log_metric=log_metric, progress=progress)
        metrics[f"{name}/expert/{cap}/val_accuracy"] = r2.best_val_accuracy
    agg, r3 = phase3_stage(backbone, cache, experts, spec.capabilities, mine["phase3"], mine["val"], cfg,
                           desc=f"{name}/phase3", log_metric=log_metric, progress=progress)
    metrics[f"{name}/phase3/val_accuracy"] = r3.best_val_accuracy
    return CategoryModel(name, list(spec.capabilities), experts.eval(), agg.eval()), metrics


def phase3_stage(backbone: Backbone, cache: TrunkCache, experts, capabilities: list[str], train: list[Sample],
                 val: list[Sample], cfg: PipelineConfig, desc: str = "phase3", log_metric: MetricFn | None = None,
                 progress: bool = True):
    """Expert features computed once for phase-3 and validation rows, then the aggregator on them."""
    feats, tg, vg = phase3_features(experts, capabilities, backbone, cache, train, val, cfg.model.feature_batch_size,
                                    progress=progress)  # (R, K, H)
    return train_aggregator(feats, tg, vg, cfg.aggregator, cfg.phase3, seed=cfg.seed, desc=desc,
                            log_metric=log_metric, progress=progress)


# ---- the whole run ------------------------------------------------------------------------------
@dataclass
class RunResult:
    model: RewardModel
    baseline: SingleRewardModel | None
    report: EvalReport
    metrics: dict[str, float]
    bundle_uri: str
    timings: dict[str, float]
    splits: dict[str, list[Sample]]


def run_pipeline(cfg: PipelineConfig, *, progress: bool = True, log_metric: MetricFn | None = None,
                 save: bool = True) -> RunResult:
    from dmoerm.bundle import save_bundle
    from dmoerm.storage import join_uri

    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str) -> None:
        nonlocal t0
        timings[name] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()

    torch.manual_seed(cfg.seed)
    backbone = load_backbone_for(cfg)
    samples, data_report = load_data(cfg)
    splits = split_samples(samples, cfg.data.splits)
    logger.info("splits: %s", {k: len(v) for k, v in splits.items()})
    lap("data")
    router, router_metrics = train_router_stage(backbone, splits, cfg, log_metric)
    for name in ("phase1", "phase3", "val"):
        assign_categories(backbone, router, splits[name], cfg.model.feature_batch_size)
    lap("router")
    caps = label_stage(cfg, splits)
    lap("labels")
    cache = TrunkCache(backbone, batch_size=cfg.model.feature_batch_size)
    train_samples = splits["phase1"] + splits["phase3"] + splits["val"]
    cache.add_samples(train_samples + [s for v in caps.train.values() for s in v]
                      + [s for v in caps.val.values() for s in v], progress=progress)
    lap("trunk_features")
    metrics: dict[str, float] = dict(router_metrics)
    categories = {}
    for spec in cfg.taxonomy:
        categories[spec.name], m = train_category(backbone, cache, cfg, spec.name, splits, caps, log_metric,
                                                  progress)
        metrics.update(m)
    lap("experts_and_aggregators")
    model = RewardModel(backbone, router, categories, batch_size=cfg.model.feature_batch_size)
    baseline = None
    base_top = None
    if cfg.baseline:
        base_top, rb = train_top(backbone, cache, splits["phase1"] + splits["phase3"], splits["val"], cfg.phase1,
                                 seed=cfg.seed, desc="baseline", log_metric=log_metric, progress=progress)
        metrics["baseline/val_accuracy"] = rb.best_val_accuracy
        baseline = SingleRewardModel(backbone, base_top, batch_size=cfg.model.feature_batch_size)
    lap("baseline")
    report = evaluate(model, splits["test"], baseline)
    metrics.update(report.metrics())
    lap("evaluate")
    uri = ""
    if save:
        uri = save_bundle(join_uri(cfg.output_dir, "bundle"), model, lora=cfg.model.lora,
                          aggregator=cfg.aggregator, router_width=cfg.router.width, baseline=base_top,
                          metrics=metrics, extra={"name": cfg.name, "data": data_report,
                                                  "category_counts": dict(Counter(s.category for s in samples))})
    lap("bundle")
    return RunResult(model, baseline, report, metrics, uri, timings, splits)
