"""Stage ``search``: the hyperparameter search of a model's last trained part, with one budget for DMoERM
and the single-RM baseline (``platform.tune``: the same number of trials, search algorithm and early
stopping for each), so the comparison is fair; with ``tune.enabled`` false neither is searched.

Targets:
- ``aggregator/<category>``: trials train the category's aggregator MLP on its cached expert features
  (hidden size, activation, dropout, learning rate, weight decay), up to ``tune.max_epochs`` epochs.
- ``baseline``: trials train the single RM (the top blocks and value head, on cached trunk features) on its
  whole training set (learning rate, weight decay), up to ``phase1.epochs``, reported per validation round.

The search is the one stage whose body the executor chooses (``search_step``'s ``search``): the Ray job
runs Ray Tune (``tuning/``), ``dmoerm train`` runs ``search_locally``; both read the space from
``search_space`` and train a trial with ``train_trial``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from dmoerm.config import PipelineConfig
from dmoerm.modeling.aggregator import AggregatorConfig
from dmoerm.stages.store import StageStore
from dmoerm.training.loop import FitHooks, TrainConfig

METRIC = "val_accuracy"
Dimension = tuple
"""``("choice", [values])``, ``("loguniform", low, high)`` or ``("uniform", low, high)``."""
Report = Callable[[int, float], None]
"""``report(round, val_accuracy)`` after every validation round (it may raise to stop the trial)."""


@dataclass(frozen=True)
class SearchTarget:
    """What a search tunes: a category's aggregator or the single-RM baseline, and the stage keys of its data."""

    kind: Literal["aggregator", "baseline"]
    inputs: tuple[str, ...]
    """aggregator: (features key,); baseline: (route key, labels key, trunk key)."""
    category: str | None = None

    @classmethod
    def aggregator(cls, features_key: str, category: str) -> SearchTarget:
        return cls("aggregator", (features_key,), category)

    @classmethod
    def baseline(cls, route_key: str, label_key: str, trunk_key: str) -> SearchTarget:
        return cls("baseline", (route_key, label_key, trunk_key))

    @property
    def name(self) -> str:
        """The stage name, ``search/<category>`` or ``search/baseline``."""
        return f"search/{self.category if self.kind == 'aggregator' else 'baseline'}"


def search_space(cfg: PipelineConfig, target: SearchTarget) -> dict[str, Dimension]:
    spec = cfg.platform.tune
    space = {"lr": ("loguniform", *spec.lr), "weight_decay": ("loguniform", *spec.weight_decay)}
    if target.kind == "aggregator":
        space = {"hidden_size": ("choice", list(spec.hidden_sizes)), "activation": ("choice", list(spec.activations)),
                 **space, "dropout": ("uniform", *spec.dropout)}
    return space


def max_rounds(cfg: PipelineConfig, target: SearchTarget) -> int:
    """Validation rounds of the longest trial (the early-stopping scheduler's maximum time)."""
    if target.kind == "aggregator":
        return cfg.platform.tune.max_epochs
    return cfg.phase1.epochs * cfg.phase1.evals_per_epoch


# ---- the settings a searched configuration stands for ------------------------------------------------
def trial_settings(config: dict, base: TrainConfig, epochs: int) -> tuple[AggregatorConfig, TrainConfig]:
    """A searched aggregator configuration and its optimisation (``epochs`` epochs, no early stop: the
    search stops weak trials itself)."""
    spec = AggregatorConfig(hidden_size=int(config["hidden_size"]), activation=config["activation"],
                            dropout=float(config["dropout"]))
    settings = TrainConfig(lr=float(config["lr"]), weight_decay=float(config["weight_decay"]), epochs=epochs,
                           batch_size=base.batch_size, patience=epochs * base.evals_per_epoch,
                           warmup_ratio=base.warmup_ratio)
    return spec, settings


def baseline_settings(config: dict, base: TrainConfig, *, trial: bool) -> TrainConfig:
    """The baseline's phase-1 settings with a searched learning rate and weight decay (a trial runs every
    round: the search stops weak trials itself)."""
    out = dataclasses.replace(base, lr=float(config["lr"]), weight_decay=float(config["weight_decay"]))
    return dataclasses.replace(out, patience=base.epochs * base.evals_per_epoch) if trial else out


# ---- one trial -------------------------------------------------------------------------------------------
def load_trial_data(cfg: PipelineConfig, store: StageStore, target: SearchTarget) -> Any:
    """What every trial of ``target`` trains on, loaded once per process."""
    if target.kind == "aggregator":
        from dmoerm.stages.phase3 import load_features

        return load_features(store, target.inputs[0])
    from dmoerm.stages.budget import baseline_train_samples
    from dmoerm.stages.data import splits_of
    from dmoerm.stages.train import trunk_cache

    route, labels, trunk = target.inputs
    train, val = baseline_train_samples(store, route, labels), splits_of(store, "route", route)["val"]
    return trunk_cache(cfg, store, trunk, train + val), train, val


def train_trial(cfg: PipelineConfig, target: SearchTarget, data: Any, config: dict, report: Report) -> None:
    """One trial: ``config``'s model trained on ``data`` (``load_trial_data``), ``report`` after each round."""
    rounds = 0

    def log_metric(name: str, value: float, step: int) -> None:
        nonlocal rounds
        if name.endswith(METRIC):
            rounds += 1
            report(rounds, value)

    hooks = FitHooks(log_metric=log_metric, progress=False)
    if target.kind == "aggregator":
        from dmoerm.training.phases import train_aggregator

        feats, groups = data
        spec, settings = trial_settings(config, cfg.phase3, cfg.platform.tune.max_epochs)
        from dmoerm.stages.base import device_for

        train_aggregator(feats, groups["phase3"], groups["val"], spec, settings, seed=cfg.seed, hooks=hooks,
                         device=device_for(cfg))
        return
    from dmoerm.stages.base import backbone_for
    from dmoerm.training.phases import train_top

    cache, train, val = data
    train_top(backbone_for(cfg), cache, train, val, baseline_settings(config, cfg.phase1, trial=True),
              seed=cfg.seed, desc="baseline", hooks=hooks)


# ---- the search ------------------------------------------------------------------------------------------
def search_locally(cfg: PipelineConfig, store: StageStore, target: SearchTarget) -> dict:
    """The search in this process: Optuna proposes one trial at a time (TPE, or random), successive halving
    stops weak ones after ``grace_period`` rounds; the best is the trial with the best round."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = cfg.platform.tune
    data = load_trial_data(cfg, store, target)
    sampler = (optuna.samplers.TPESampler(seed=cfg.seed) if spec.search == "optuna"
               else optuna.samplers.RandomSampler(seed=cfg.seed))
    pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=min(spec.grace_period, max_rounds(cfg, target)),
                                                   reduction_factor=4)
    study = optuna.create_study(direction="maximize", sampler=sampler, pruner=pruner)
    best: dict = {"config": None, METRIC: -math.inf, "epochs": 0}
    space = search_space(cfg, target)

    def suggest(trial: optuna.Trial, name: str, dim: Dimension) -> Any:
        if dim[0] == "choice":
            return trial.suggest_categorical(name, dim[1])
        return trial.suggest_float(name, dim[1], dim[2], log=dim[0] == "loguniform")

    def objective(trial: optuna.Trial) -> float:
        config = {name: suggest(trial, name, dim) for name, dim in space.items()}
        seen = []

        def report(rnd: int, acc: float) -> None:
            seen.append(acc)
            if acc > best[METRIC]:
                best.update({"config": config, METRIC: acc, "epochs": rnd})
            trial.report(acc, rnd)
            if trial.should_prune():
                raise optuna.TrialPruned()

        train_trial(cfg, target, data, config, report)
        return max(seen)

    study.optimize(objective, n_trials=spec.num_samples)
    if best["config"] is None:
        raise ValueError(f"{target.name}: no trial reached a validation accuracy (no validation pairs?)")
    return {**best, "trials": len(study.trials)}


Search = Callable[[PipelineConfig, StageStore, SearchTarget], dict]
"""``(cfg, store, target) -> {"config", "val_accuracy", "epochs", "trials"}``."""


def search_step(cfg: PipelineConfig, store: StageStore, target: SearchTarget, search: Search = search_locally) -> str:
    """The best configuration ``search`` found, stored once per (target, search settings, seed)."""
    trained = cfg.phase3 if target.kind == "aggregator" else cfg.phase1
    key = store.key(target=target, tune=cfg.platform.tune, settings=trained, seed=cfg.seed)
    if store.done("search", key) is None:
        best = search(cfg, store, target)
        store.put_json("search", key, "best.json", best)
        store.mark_done("search", key, {"best_val_accuracy": best[METRIC], "trials": best["trials"]})
    return key
