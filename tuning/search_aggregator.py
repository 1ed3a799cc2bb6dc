"""Aggregator search with Ray Tune on the cached expert features of one category.

The experts are frozen in phase 3, so their features are computed once (the `features` stage) and every
trial only trains a small MLP: trials cost almost nothing. ASHA stops weak trials early; Optuna's TPE
(or random search) proposes configurations; each trial is an MLflow run under the search's run.
"""

from __future__ import annotations

import functools
import os

from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter

from dmoerm.config import PipelineConfig, TuneSpec
from dmoerm.modeling.aggregator import AggregatorSpec
from dmoerm.stages.steps import load_features
from dmoerm.stages.store import StageStore
from dmoerm.training.loop import TrainSettings

METRIC = "val_accuracy"


def param_space(spec: TuneSpec) -> dict:
    return {
        "hidden_size": tune.choice(spec.hidden_sizes),
        "activation": tune.choice(spec.activations),
        "lr": tune.loguniform(*spec.lr),
        "weight_decay": tune.loguniform(*spec.weight_decay),
        "dropout": tune.uniform(*spec.dropout),
    }


def trial_settings(config: dict, base: TrainSettings, max_epochs: int) -> tuple[AggregatorSpec, TrainSettings]:
    spec = AggregatorSpec(hidden_size=int(config["hidden_size"]), activation=config["activation"],
                          dropout=float(config["dropout"]))
    settings = TrainSettings(lr=float(config["lr"]), weight_decay=float(config["weight_decay"]),
                             epochs=int(config.get("epochs", max_epochs)), batch_size=base.batch_size,
                             patience=int(config.get("epochs", max_epochs)), warmup_ratio=base.warmup_ratio)
    return spec, settings


@functools.lru_cache(maxsize=4)
def _features(storage: str, key: str):
    return load_features(StageStore(storage), key)


def _trainable(config: dict, *, storage: str, features_key: str, base: TrainSettings, max_epochs: int,
               seed: int) -> None:
    import torch

    from dmoerm.training.phases import train_aggregator

    torch.set_num_threads(1)
    feats, groups = _features(storage, features_key)
    spec, settings = trial_settings(config, base, max_epochs)
    epoch = {"n": 0}

    def report(name: str, value: float, step: int) -> None:
        if name.endswith("val_accuracy"):
            epoch["n"] += 1
            tune.report({METRIC: value, "epoch": epoch["n"]})

    train_aggregator(feats, groups["phase3"], groups["val"], spec, settings, seed=seed, log_metric=report,
                     progress=False)


def search_aggregator(cfg: PipelineConfig, storage: str, features_key: str, category: str,
                      tracking_uri: str | None = None, experiment: str | None = None,
                      parent_run_id: str | None = None) -> dict:
    """Run the search; returns the best trial's config and validation accuracy."""
    spec = cfg.platform.tune
    if spec.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        searcher = ConcurrencyLimiter(OptunaSearch(seed=cfg.seed), max_concurrent=spec.max_concurrent)
    else:
        searcher = None
    callbacks = []
    if tracking_uri:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        callbacks.append(MLflowLoggerCallback(tracking_uri=tracking_uri, experiment_name=experiment,
                                              tags={"mlflow.parentRunId": parent_run_id, "dmoerm.category": category},
                                              save_artifact=False))
    trainable = tune.with_parameters(_trainable, storage=storage, features_key=features_key, base=cfg.phase3,
                                     max_epochs=spec.max_epochs, seed=cfg.seed)
    trainable = tune.with_resources(trainable, {"cpu": 1})
    tuner = tune.Tuner(
        trainable,
        param_space=param_space(spec),
        tune_config=tune.TuneConfig(metric=METRIC, mode="max", num_samples=spec.num_samples, search_alg=searcher,
                                    scheduler=ASHAScheduler(max_t=spec.max_epochs, grace_period=spec.grace_period,
                                                            time_attr="epoch"),
                                    max_concurrent_trials=spec.max_concurrent),
        run_config=tune.RunConfig(name=f"aggregator-{category}-{features_key}", storage_path=_tune_storage(storage),
                                  callbacks=callbacks, verbose=0),
    )
    grid = tuner.fit()
    best = grid.get_best_result(metric=METRIC, mode="max", scope="all")
    return {"config": {k: best.config[k] for k in param_space(spec)}, METRIC: best.metrics.get(METRIC),
            "epochs": int(best.metrics.get("epoch", spec.max_epochs)), "trials": len(grid)}


def _tune_storage(storage: str) -> str:
    from dmoerm.storage import is_s3, join_uri

    return join_uri(storage, "ray_tune") if is_s3(storage) else os.path.abspath(os.path.join(storage, "ray_tune"))
