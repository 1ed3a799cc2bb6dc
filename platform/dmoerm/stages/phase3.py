"""Stages ``features``, ``search`` and ``aggregator``: every frozen expert's pooled hidden state of a
category's phase-3 and validation rows, computed once; the search of the aggregator's hyperparameters on
them; the final aggregator.

The search is the one stage whose body the executor chooses (``search_step``'s ``search``): the Ray job
runs Ray Tune (``tuning/``), ``dmoerm train`` runs ``search_locally``, both over ``platform.tune``'s space
and budget. With ``platform.tune.enabled`` false there is no search: the aggregator is ``cfg.aggregator``
trained with ``cfg.phase3``, and both executors build the same bundle.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable

import torch
from safetensors.torch import load_file

from dmoerm.bundle import save_tensors
from dmoerm.config import PipelineConfig
from dmoerm.configtools import to_dict
from dmoerm.modeling.aggregator import Aggregator, AggregatorConfig
from dmoerm.stages.base import backbone_for
from dmoerm.stages.data import splits_of
from dmoerm.stages.store import StageStore
from dmoerm.stages.train import load_experts, trunk_cache
from dmoerm.training.loop import FitHooks, Group, TrainConfig
from dmoerm.training.phases import phase3_features, train_aggregator

logger = logging.getLogger(__name__)
METRIC = "val_accuracy"
Features = tuple[torch.Tensor, dict[str, list[Group]]]
Search = Callable[[PipelineConfig, StageStore, str, str], dict]
"""``(cfg, store, features_key, category) -> {"config", "val_accuracy", "epochs", "trials"}``."""


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


# ---- the search ------------------------------------------------------------------------------------
def trial_settings(config: dict, base: TrainConfig, epochs: int) -> tuple[AggregatorConfig, TrainConfig]:
    """A searched configuration as an aggregator and its optimisation (``epochs`` epochs, no early stop:
    the search stops weak trials itself)."""
    spec = AggregatorConfig(hidden_size=int(config["hidden_size"]), activation=config["activation"],
                            dropout=float(config["dropout"]))
    settings = TrainConfig(lr=float(config["lr"]), weight_decay=float(config["weight_decay"]), epochs=epochs,
                           batch_size=base.batch_size, patience=epochs, warmup_ratio=base.warmup_ratio)
    return spec, settings


def train_trial(features: Features, config: dict, cfg: PipelineConfig, report: Callable[[int, float], None]) -> None:
    """One search trial: the aggregator of ``config`` trained on the cached features; ``report(epoch,
    val_accuracy)`` after every epoch (it may raise to stop the trial)."""
    feats, groups = features
    spec, settings = trial_settings(config, cfg.phase3, cfg.platform.tune.max_epochs)
    epochs = 0

    def log_metric(name: str, value: float, step: int) -> None:
        nonlocal epochs
        if name.endswith(METRIC):
            epochs += 1
            report(epochs, value)

    train_aggregator(feats, groups["phase3"], groups["val"], spec, settings, seed=cfg.seed,
                     hooks=FitHooks(log_metric=log_metric, progress=False))


def search_locally(cfg: PipelineConfig, store: StageStore, features_key: str, category: str) -> dict:
    """The search in this process: Optuna proposes one trial at a time (TPE, or random), successive halving
    stops weak ones after ``grace_period`` epochs; the best is the trial with the best epoch."""
    import optuna

    spec = cfg.platform.tune
    features = load_features(store, features_key)
    sampler = (optuna.samplers.TPESampler(seed=cfg.seed) if spec.search == "optuna"
               else optuna.samplers.RandomSampler(seed=cfg.seed))
    pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=spec.grace_period, reduction_factor=4)
    study = optuna.create_study(direction="maximize", sampler=sampler, pruner=pruner)
    best: dict = {"config": None, METRIC: -math.inf, "epochs": 0}

    def objective(trial: optuna.Trial) -> float:
        config = {"hidden_size": trial.suggest_categorical("hidden_size", spec.hidden_sizes),
                  "activation": trial.suggest_categorical("activation", spec.activations),
                  "lr": trial.suggest_float("lr", *spec.lr, log=True),
                  "weight_decay": trial.suggest_float("weight_decay", *spec.weight_decay, log=True),
                  "dropout": trial.suggest_float("dropout", *spec.dropout)}
        seen = []

        def report(epoch: int, acc: float) -> None:
            seen.append(acc)
            if acc > best[METRIC]:
                best.update({"config": config, METRIC: acc, "epochs": epoch})
            trial.report(acc, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()

        train_trial(features, config, cfg, report)
        return max(seen)

    study.optimize(objective, n_trials=spec.num_samples)
    if best["config"] is None:
        raise ValueError(f"search/{category}: no trial reached a validation accuracy (no validation pairs?)")
    return {**best, "trials": len(study.trials)}


def search_step(cfg: PipelineConfig, store: StageStore, features_key: str, category: str,
                search: Search = search_locally) -> str:
    """The best configuration ``search`` found, stored once per (features, search settings, seed)."""
    key = store.key(features=features_key, tune=cfg.platform.tune, seed=cfg.seed)
    if store.done("search", key) is None:
        best = search(cfg, store, features_key, category)
        store.put_json("search", key, "best.json", best)
        store.mark_done("search", key, {"best_val_accuracy": best[METRIC], "trials": best["trials"]})
    return key


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
                                       hooks=FitHooks(progress=False))
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
