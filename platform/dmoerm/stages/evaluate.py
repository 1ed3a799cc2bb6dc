"""Stage ``evaluate``: compose the model from its stages, evaluate it and the baseline on the test split,
write the bundle (the one artifact both executors produce) and the report."""

from __future__ import annotations

import shutil
from collections import Counter
from dataclasses import dataclass

from dmoerm import storage
from dmoerm.bundle import save_bundle
from dmoerm.config import PipelineConfig
from dmoerm.ensemble import save_ensemble
from dmoerm.evaluation import evaluate
from dmoerm.modeling.reward_model import CategoryModel, RewardModel, SingleRewardModel
from dmoerm.stages.base import backbone_for
from dmoerm.stages.budget import budget_lines, data_budgets
from dmoerm.stages.data import splits_of
from dmoerm.stages.ensemble import compare_extra_models, ensemble_rewards, extra_metrics, load_ensemble_members
from dmoerm.stages.phase3 import aggregator_spec, load_aggregator
from dmoerm.stages.route import load_router
from dmoerm.stages.store import StageStore
from dmoerm.stages.train import load_experts, load_top
from dmoerm.uncertainty import META_KEY, capability_stats, stats_to_meta


@dataclass
class CategoryKeys:
    phase1: str
    experts: dict[str, str]
    aggregator: str


def training_metrics(store: StageStore, route_key: str, categories: dict[str, CategoryKeys],
                     baseline_key: str | None) -> dict[str, float]:
    """Every stage's validation figures, as the bundle records them."""
    route = store.done("route", route_key) or {}
    out = {k: v for k, v in route.items() if isinstance(v, (int, float))}
    for name, k in categories.items():
        out[f"{name}/phase1/val_accuracy"] = store.done("phase1", k.phase1)["val_accuracy"]
        for cap, key in k.experts.items():
            out[f"{name}/expert/{cap}/val_accuracy"] = store.done("experts", key)["val_accuracy"]
        out[f"{name}/phase3/val_accuracy"] = store.done("aggregator", k.aggregator)["val_accuracy"]
    if baseline_key:
        out["baseline/val_accuracy"] = store.done("baseline", baseline_key)["val_accuracy"]
    return out


def tuning_note(cfg: PipelineConfig) -> str:
    """The tuning each model of the comparison had, as the report states it."""
    t = cfg.platform.tune
    if not t.enabled:
        return "none for either model (platform.tune.enabled: false)"
    who = "each category's aggregator" + (" and the single RM" if cfg.baseline else "")
    return f"{t.num_samples} {t.search} trials for {who} (platform.tune)"


def evaluate_step(cfg: PipelineConfig, store: StageStore, data_key: str, route_key: str, label_key: str,
                  categories: dict[str, CategoryKeys], baseline_key: str | None,
                  ensemble_keys: list[str] | None = None) -> str:
    """``ensemble_keys``: the RM-ensemble members (``stages.ensemble``), evaluated beside DMoERM as one row
    per combination and saved as ``bundle/ensemble``. The bundle also stores the experts' score statistics
    on the phase-3 split (training rows), for the uncertainty-penalised reward (``dmoerm.uncertainty``)."""
    members = list(ensemble_keys or [])
    key = store.key(route=route_key, labels=label_key, categories=categories, baseline=baseline_key,
                    **({"ensemble": members} if members else {}))
    if store.done("evaluate", key) is None:
        bb = backbone_for(cfg)
        cats = {}
        for c in cfg.taxonomy:
            k = categories[c.name]
            cats[c.name] = CategoryModel(c.name, list(c.capabilities),
                                         load_experts(cfg, store, k.phase1, k.experts, c.name),
                                         load_aggregator(store, k.aggregator, len(c.capabilities), bb.hidden_size))
        model = RewardModel(bb, load_router(cfg, store, route_key), cats, batch_size=cfg.model.feature_batch_size)
        base_top = load_top(cfg, store, "baseline", baseline_key) if baseline_key else None
        baseline = SingleRewardModel(bb, base_top, cfg.model.feature_batch_size) if base_top is not None else None
        splits = splits_of(store, "route", route_key)
        report = evaluate(model, splits["test"], baseline)
        ensemble = load_ensemble_members(cfg, store, members) if members else None
        extra = compare_extra_models(report, splits["test"], ensemble_rewards(ensemble, splits["test"])
                                     ) if ensemble is not None else {}
        budgets = {**data_budgets(store, route_key, label_key, baseline is not None), "tuning": tuning_note(cfg)}
        report.notes.extend(budget_lines(budgets, budgets["tuning"]))
        data = {k: v for k, v in (store.done("data", data_key) or {}).items() if k != "run"}
        counts = Counter(s.category for part in splits.values() for s in part)
        save_bundle(store.local("evaluate", key) / "bundle", model, lora=cfg.model.lora,
                    aggregator=aggregator_spec(store, categories[cfg.taxonomy[0].name].aggregator),
                    router_width=cfg.router.width, baseline=base_top,
                    metrics={**training_metrics(store, route_key, categories, baseline_key), **report.metrics(),
                             **extra_metrics(extra)},
                    extra={"name": cfg.name, "data": data, "category_counts": dict(counts),
                           META_KEY: stats_to_meta(capability_stats(model, splits["phase3"]))})
        if ensemble is not None:
            save_ensemble(store.local("evaluate", key) / "bundle" / "ensemble", ensemble.tops,
                          {"seeds": ensemble.seeds, "uncertainty_weight": ensemble.uncertainty_weight,
                           "combinations": list(extra)}, backbone=bb)
        summary = {k: v for k, v in report.to_dict().items() if k != "pairs"}  # pairs: the outcome files below
        store.put_json("evaluate", key, "report.json", {**summary, "table": report.table(),
                                                        "budgets": budgets, "ensembles": extra})
        store.put_json("evaluate", key, "pair_outcomes.json", {k: list(v) for k, v in report.outcomes.items()})
        store.put_samples("evaluate", key, "test.jsonl", splits["test"])  # a later holder is re-scored on it
        if report.baseline_outcomes is not None:
            store.put_json("evaluate", key, "baseline_pair_outcomes.json",
                           {k: list(v) for k, v in report.baseline_outcomes.items()})
        store.mark_done("evaluate", key, {"metrics": {**report.metrics(), **extra_metrics(extra)}})
    return key


def publish_bundle(store: StageStore, evaluation_key: str, target: str) -> str:
    """Copy the evaluated bundle to ``target`` (a folder or ``s3://`` prefix); returns ``target``."""
    bundle = store.path("evaluate", evaluation_key, "bundle")
    if storage.is_s3(target):
        storage.upload_dir(str(bundle), target)
    else:
        shutil.copytree(bundle, target, dirs_exist_ok=True)
    return target
