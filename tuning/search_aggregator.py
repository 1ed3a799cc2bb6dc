"""Aggregator search with Ray Tune on the cached expert features of one category: the Ray job's ``search``
for ``dmoerm.stages.phase3.search_step``.

The experts are frozen in phase 3, so their features are computed once (the ``features`` stage) and every
trial only trains a small MLP (``dmoerm.stages.phase3.train_trial``): trials cost almost nothing. ASHA
stops weak trials early; Optuna's TPE (or random search) proposes configurations; each trial is an MLflow
run under the search's run.
"""

from __future__ import annotations

from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter

from dmoerm.config import PipelineConfig, TuneConfig
from dmoerm.stages.phase3 import METRIC, Features, load_features, train_trial
from dmoerm.stages.store import StageStore
from dmoerm.storage import join_uri
from dmoerm.tracking import Tracker

_FEATURES: dict[tuple[str, str], Features] = {}  # per trial process: a category's features, loaded once


def param_space(spec: TuneConfig) -> dict:
    return {
        "hidden_size": tune.choice(spec.hidden_sizes),
        "activation": tune.choice(spec.activations),
        "lr": tune.loguniform(*spec.lr),
        "weight_decay": tune.loguniform(*spec.weight_decay),
        "dropout": tune.uniform(*spec.dropout),
    }


def _trainable(config: dict, *, cfg: PipelineConfig, store: StageStore, features_key: str) -> None:
    import torch

    torch.set_num_threads(1)
    if (store.root, features_key) not in _FEATURES:
        _FEATURES[(store.root, features_key)] = load_features(store, features_key)
    train_trial(_FEATURES[(store.root, features_key)], config, cfg,
                lambda epoch, acc: tune.report({METRIC: acc, "epoch": epoch}))


def search_aggregator(cfg: PipelineConfig, store: StageStore, features_key: str, category: str,
                      tracker: Tracker | None = None, parent_run_id: str | None = None) -> dict:
    """Run the search; the best trial's config, validation accuracy and epochs, and the trial count."""
    spec = cfg.platform.tune
    searcher = None
    if spec.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        searcher = ConcurrencyLimiter(OptunaSearch(seed=cfg.seed), max_concurrent=spec.max_concurrent)
    callbacks = []
    if tracker is not None:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        experiment = tracker.client.get_experiment(tracker.experiment_id).name
        callbacks.append(MLflowLoggerCallback(tracking_uri=tracker.tracking_uri, experiment_name=experiment,
                                              tags={"mlflow.parentRunId": parent_run_id, "dmoerm.category": category},
                                              save_artifact=False))
    trainable = tune.with_parameters(_trainable, cfg=cfg, store=store, features_key=features_key)
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 1}),
        param_space=param_space(spec),
        tune_config=tune.TuneConfig(metric=METRIC, mode="max", num_samples=spec.num_samples, search_alg=searcher,
                                    scheduler=ASHAScheduler(max_t=spec.max_epochs, grace_period=spec.grace_period,
                                                            time_attr="epoch"),
                                    max_concurrent_trials=spec.max_concurrent),
        run_config=tune.RunConfig(name=f"aggregator-{category}-{features_key}", callbacks=callbacks, verbose=0,
                                  storage_path=join_uri(store.root, "ray_tune")),
    )
    grid = tuner.fit()
    best = grid.get_best_result(metric=METRIC, mode="max", scope="all")
    return {"config": {k: best.config[k] for k in param_space(spec)}, METRIC: best.metrics.get(METRIC),
            "epochs": int(best.metrics.get("epoch", spec.max_epochs)), "trials": len(grid)}
