"""Aggregator search with Ray Tune: trials per minute on cached expert features vs recomputing them per trial.

The pipeline's stages up to ``features`` run once, keyed and kept under the scratch storage (MiniLM at max_length
64, real hh-rlhf rows, two categories with 3 capability experts each, experts trained briefly in-process: their
weights do not change the cost). Then the same Tune search (same search space, ``--trials`` random-search trials,
``--epochs`` epochs each, ``max_concurrent`` 2, ASHA with ``grace_period = max_t`` so no trial is stopped early,
each trial 1 CPU on ``ray.init(num_cpus=2)``) runs twice on one category:
  cached      ``tuning.search_hparams.search_hparams`` itself: trials train the aggregator on the features the
              ``features`` stage computed once;
  recomputed  the released research code's way: a trial loads the frozen experts and the trunk cache, and
              recomputes every expert's pooled hidden state from the cached trunk states for every batch of every
              epoch (each phase-3 row once per epoch, the validation rows at every evaluation), then the
              aggregator; the same ``fit_pairwise`` loop, settings and reports otherwise.
Both searches draw their trial configurations from the same seeded random state (checked). Figures are wall
time of ``Tuner.fit`` (Ray's trials run in other processes; the load average is reported beside them).
The last line printed is one JSON object of figures.

    python bench/bench_tune.py [--trials 6] [--epochs 6] [--fresh]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
from bench_ray_phase2 import SCRATCH, log, ray_init, run_upstream  # also sets up the environment and sys.path
from bench_ray_phase2 import build_config as phase2_config

from dmoerm.config import PipelineConfig
from dmoerm.stages.base import backbone_for
from dmoerm.stages.data import splits_of
from dmoerm.stages.phase3 import features_step, load_features
from dmoerm.stages.store import StageStore
from dmoerm.stages.train import expert_key, load_experts, train_expert_step, trunk_cache
from dmoerm.training.loop import FitHooks

CATEGORY = "helpful"


def _recompute_trainable(config: dict, *, cfg: PipelineConfig, storage: str, keys: dict, max_epochs: int) -> None:
    """One trial as the released code ran phase 3: frozen experts recomputed from the trunk cache every batch."""
    import torch
    from ray import tune

    from dmoerm.modeling.aggregator import Aggregator
    from dmoerm.modeling.top import run_experts
    from dmoerm.stages.search import METRIC, trial_settings
    from dmoerm.training.loop import fit_pairwise
    from dmoerm.training.phases import human_groups

    torch.set_num_threads(1)
    store = StageStore(storage)
    splits = splits_of(store, "route", keys["route"], CATEGORY)
    cache = trunk_cache(cfg, store, keys["trunk"], splits["phase3"] + splits["val"])
    experts = load_experts(cfg, store, keys["phase1"], keys["experts"], CATEGORY)
    caps = cfg.category(CATEGORY).capabilities
    backbone = backbone_for(cfg)
    groups = {n: human_groups(splits[n], cache) for n in ("phase3", "val")}  # trunk-cache row ids
    spec, settings = trial_settings(config, cfg.phase3, max_epochs)
    torch.manual_seed(cfg.seed)
    agg = Aggregator(len(caps), backbone.hidden_size, spec)  # as train_aggregator builds it

    def reward(rows) -> torch.Tensor:
        with torch.no_grad():
            feats = run_experts(experts, caps, backbone, *cache.collate(list(rows))).pooled  # (N, K, H)
        return agg(feats)

    epoch = {"n": 0}

    def report(name: str, value: float, step: int) -> None:
        if name.endswith("val_accuracy"):
            epoch["n"] += 1
            tune.report({METRIC: value, "epoch": epoch["n"]})

    fit_pairwise(agg, list(agg.parameters()), reward, groups["phase3"], groups["val"], cache.lengths(), settings,
                 seed=cfg.seed, desc="phase3/recompute", hooks=FitHooks(log_metric=report, progress=False))


def recomputed_search(cfg: PipelineConfig, storage: str, keys: dict) -> tuple[float, list[dict]]:
    """The Tuner of ``search_hparams`` (random search) with the recomputing trainable."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from dmoerm.stages.search import METRIC, SearchTarget, search_space
    from tuning.search_hparams import param_space

    spec = cfg.platform.tune
    trainable = tune.with_parameters(_recompute_trainable, cfg=cfg, storage=storage, keys=keys,
                                     max_epochs=spec.max_epochs)
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 1}),
        param_space=param_space(search_space(cfg, SearchTarget.aggregator("", CATEGORY))),
        tune_config=tune.TuneConfig(metric=METRIC, mode="max", num_samples=spec.num_samples, search_alg=None,
                                    scheduler=ASHAScheduler(max_t=spec.max_epochs, grace_period=spec.grace_period,
                                                            time_attr="epoch"),
                                    max_concurrent_trials=spec.max_concurrent),
        run_config=tune.RunConfig(name="recomputed", storage_path=os.path.join(storage, "ray_tune"), verbose=0),
    )
    seed_all(cfg.seed)
    start = time.perf_counter()
    grid = tuner.fit()
    seconds = time.perf_counter() - start
    if grid.errors:
        raise RuntimeError(f"recomputed search: {grid.errors[0]}")
    return seconds, [r.config for r in grid]


def seed_all(seed: int) -> None:
    """Tune's random search samples from the global random states: the same draws for both searches."""
    random.seed(seed)
    np.random.seed(seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6, help="trials per search")
    parser.add_argument("--epochs", type=int, default=6, help="epochs per trial (no early stopping)")
    parser.add_argument("--samples-per-file", type=int, default=160, help="hh-rlhf samples per category")
    parser.add_argument("--fresh", action="store_true", help="recompute the stages up to features too")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    root = SCRATCH / "tune"
    if args.fresh:
        shutil.rmtree(root, ignore_errors=True)
    storage = str(root / "storage")
    tune_spec = {"num_samples": args.trials, "max_concurrent": 2, "search": "random", "max_epochs": args.epochs,
                 "grace_period": args.epochs}
    cfg = phase2_config(root / "storage", samples_per_file=args.samples_per_file, label_samples=60, epochs=1,
                        capabilities=3, tune=tune_spec)
    store = StageStore(storage, run_id="bench")
    load = {"before": [round(x, 2) for x in os.getloadavg()]}

    start = time.perf_counter()
    inputs, tops = run_upstream(cfg, store)
    expert_keys = {}
    for inp in (i for i in inputs if i.category == CATEGORY):
        key = expert_key(cfg, store, inp)
        if store.done("experts", key) is None:
            train_expert_step(cfg, store, inp, key, FitHooks(progress=False))
        expert_keys[inp.capability] = key
    route, trunk = inputs[0].route, inputs[0].trunk
    features = features_step(cfg, store, route, trunk, tops[CATEGORY], expert_keys, CATEGORY)
    stages_s = time.perf_counter() - start
    feats, groups = load_features(store, features)
    log(f"stages up to features {stages_s:.1f} s; features {tuple(feats.shape)}")

    import ray

    from dmoerm.stages.search import SearchTarget, search_space
    from tuning.search_hparams import experiment_name, search_hparams

    shutil.rmtree(root / "storage" / "ray_tune", ignore_errors=True)
    ray_init(2)
    # cached first, then recomputed, in the same Ray session on the same inputs
    seed_all(cfg.seed)
    start = time.perf_counter()
    target = SearchTarget.aggregator(features, CATEGORY)
    best = search_hparams(cfg, store, target)
    cached_s = time.perf_counter() - start
    load["after_cached"] = [round(x, 2) for x in os.getloadavg()]
    log(f"cached search {cached_s:.1f} s: {best}")
    names = list(search_space(cfg, target))
    cached_configs = _tune_configs(root / "storage" / "ray_tune", experiment_name(target), names)
    recomputed_s, recomputed_configs = recomputed_search(
        cfg, storage, {"route": route, "trunk": trunk, "phase1": tops[CATEGORY], "experts": expert_keys})
    load["after_recomputed"] = [round(x, 2) for x in os.getloadavg()]
    log(f"recomputed search {recomputed_s:.1f} s")
    ray.shutdown()

    same = sorted(json.dumps({k: c[k] for k in names}, sort_keys=True) for c in recomputed_configs) == cached_configs
    figures = {
        "trials": args.trials, "epochs_per_trial": args.epochs, "max_concurrent": 2,
        "trials_per_min_cached": round(args.trials / cached_s * 60, 2),
        "trials_per_min_recomputed": round(args.trials / recomputed_s * 60, 2),
        "ratio": round(recomputed_s / cached_s, 2),
        "search_cached_s": round(cached_s, 1), "search_recomputed_s": round(recomputed_s, 1),
        "same_trial_configs": same, "experts": feats.size(1), "feature_rows": feats.size(0),
        "phase3_groups": len(groups["phase3"]), "val_groups": len(groups["val"]),
        "stages_to_features_s": round(stages_s, 1), "cpu_count": os.cpu_count(), "load_avg": load,
    }
    print(json.dumps(figures))


def _tune_configs(tune_root: Path, name: str, keys: list[str]) -> list[str]:
    """The trial configs of a finished search, read back from its trials' params.json."""
    params = [json.loads(p.read_text()) for p in (tune_root / name).glob("*/params.json")]
    return sorted(json.dumps({k: c[k] for k in keys}, sort_keys=True) for c in params)


if __name__ == "__main__":
    main()
