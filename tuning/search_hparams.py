"""Hyperparameter search with Ray Tune: the Ray job's ``search`` for ``dmoerm.stages.search.search_step``,
for a category's aggregator and for the single-RM baseline alike (one tuning budget, ``platform.tune``).

Every trial trains on cached features (``dmoerm.stages.search.load_trial_data``, loaded once per trial
process): the aggregator on the frozen experts' features, where trials cost almost nothing; the baseline on
the frozen trunk's. ASHA stops weak trials early; Optuna's TPE (or random search) proposes configurations;
each trial is an MLflow run under the search's run.
"""

from __future__ import annotations

from typing import Any

from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter

from dmoerm.config import PipelineConfig
from dmoerm.stages.search import METRIC, Dimension, SearchTarget, load_trial_data, max_rounds, search_space, train_trial
from dmoerm.stages.store import StageStore
from dmoerm.storage import join_uri
from dmoerm.tracking import Tracker

_DATA: dict[tuple[str, SearchTarget], Any] = {}  # per trial process: a target's trial data, loaded once


def param_space(space: dict[str, Dimension]) -> dict:
    """``dmoerm.stages.search.search_space`` as Ray Tune's domains."""
    kinds = {"choice": lambda d: tune.choice(d[1]), "loguniform": lambda d: tune.loguniform(d[1], d[2]),
             "uniform": lambda d: tune.uniform(d[1], d[2])}
    return {name: kinds[dim[0]](dim) for name, dim in space.items()}


def experiment_name(target: SearchTarget) -> str:
    """The Tune experiment's folder under ``<storage_uri>/ray_tune``."""
    return f"{target.name.replace('/', '-')}-{'-'.join(target.inputs)}"


def _trainable(config: dict, *, cfg: PipelineConfig, store: StageStore, target: SearchTarget) -> None:
    import torch

    torch.set_num_threads(1)
    if (store.root, target) not in _DATA:
        _DATA[(store.root, target)] = load_trial_data(cfg, store, target)
    train_trial(cfg, target, _DATA[(store.root, target)], config,
                lambda rnd, acc: tune.report({METRIC: acc, "epoch": rnd}))


def search_hparams(cfg: PipelineConfig, store: StageStore, target: SearchTarget, tracker: Tracker | None = None,
                   parent_run_id: str | None = None) -> dict:
    """Run the search; the best trial's config, validation accuracy and rounds, and the trial count."""
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
                                              tags={"mlflow.parentRunId": parent_run_id,
                                                    "dmoerm.search": target.name}, save_artifact=False))
    space = param_space(search_space(cfg, target))
    rounds = max_rounds(cfg, target)
    trainable = tune.with_parameters(_trainable, cfg=cfg, store=store, target=target)
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 1}),
        param_space=space,
        tune_config=tune.TuneConfig(metric=METRIC, mode="max", num_samples=spec.num_samples, search_alg=searcher,
                                    scheduler=ASHAScheduler(max_t=rounds, grace_period=min(spec.grace_period, rounds),
                                                            time_attr="epoch"),
                                    max_concurrent_trials=spec.max_concurrent),
        run_config=tune.RunConfig(name=experiment_name(target), callbacks=callbacks, verbose=0,
                                  storage_path=join_uri(store.root, "ray_tune")),
    )
    grid = tuner.fit()
    best = grid.get_best_result(metric=METRIC, mode="max", scope="all")
    return {"config": {k: best.config[k] for k in space}, METRIC: best.metrics.get(METRIC),
            "epochs": int(best.metrics.get("epoch", rounds)), "trials": len(grid)}
