"""Stage ``ensemble``: the RM-ensemble baselines' members, and their rows in the evaluation report.

A member IS the single-RM baseline with another seed: ``top_step`` (category None) on the baseline's
training set (``stages.budget.baseline_train_samples``: every human-ranked sample DMoERM learnt from), with
its settings and its searched settings when the search ran, so each member has the baseline's data and
tuning budget. Its trained top lives under the ``baseline`` stage (keyed by its seed; the member with the
run's seed is the baseline itself, trained once); the ``ensemble`` stage records which one is the member.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from dmoerm.config import PipelineConfig
from dmoerm.data.records import Sample
from dmoerm.ensemble import COMBINATIONS, RewardEnsemble
from dmoerm.evaluation import EvalReport, accuracy_by_category, pair_outcomes
from dmoerm.names import metric_name
from dmoerm.stages.base import backbone_for
from dmoerm.stages.search import SearchTarget
from dmoerm.stages.store import StageStore
from dmoerm.stages.train import load_top, top_step


def ensemble_member_step(cfg: PipelineConfig, store: StageStore, route_key: str, label_key: str, trunk_key: str,
                         seed: int, search_key: str | None = None) -> str:
    """One member: the single RM's recipe (``top_step``, ``search_key``'s settings when given) with ``seed``."""
    base_key = top_step(dataclasses.replace(cfg, seed=seed), store, route_key, trunk_key, None, label_key,
                        search_key)
    key = store.key(baseline=base_key, seed=seed)
    if store.done("ensemble", key) is None:
        info = store.done("baseline", base_key) or {}
        store.mark_done("ensemble", key, {"baseline_key": base_key, "seed": seed, "trained_by_run": info.get("run"),
                                          **{k: info.get(k) for k in ("val_accuracy", "steps", "train_samples")}})
    return key


def train_members(ex: Any, route_key: str, label_key: str, trunk_key: str, search_key: str | None) -> list[str]:
    """Every member of ``cfg.ensemble`` through the executor ``ex`` (``dmoerm.pipeline.Executor``):
    concurrently where it can (the Ray job: one Ray task each). ``search_key``: the baseline's search (None
    without one: with ``platform.tune.enabled`` it is run here, the same search the baseline would have)."""
    cfg = ex.cfg
    if search_key is None and cfg.platform.tune.enabled:
        search_key = ex.search(SearchTarget.baseline(route_key, label_key, trunk_key))
    seeds = cfg.ensemble.member_seeds(cfg.seed)
    calls = [(route_key, label_key, trunk_key, s, search_key) for s in seeds]
    return ex.run_many(ensemble_member_step, calls, [f"ensemble/seed{s}" for s in seeds])


def load_ensemble_members(cfg: PipelineConfig, store: StageStore, keys: Sequence[str]) -> RewardEnsemble:
    """The members of ``keys`` (``ensemble`` stage) as one ensemble on the run's backbone."""
    infos = [store.done("ensemble", k) for k in keys]
    missing = [k for k, i in zip(keys, infos) if i is None]
    if missing:
        raise ValueError(f"ensemble members {missing} are not done; run the ensemble stage first")
    tops = [load_top(cfg, store, "baseline", i["baseline_key"]) for i in infos]  # type: ignore[index]
    return RewardEnsemble(backbone_for(cfg), tops, batch_size=cfg.model.feature_batch_size,
                          seeds=[i["seed"] for i in infos], uncertainty_weight=cfg.ensemble.uncertainty_weight)  # type: ignore[index]


def compare_extra_models(report: EvalReport, samples: Sequence[Sample], extra: dict[str, list[list[float]]], *,
                         confidence: float = 0.95, num_bootstrap: int = 2000, seed: int = 0) -> dict[str, dict]:
    """More reward models beside DMoERM in one report: each one's accuracy per category on the report's
    pairs (the same pairs: those identical after truncation left out) and the paired-bootstrap interval of
    accuracy(DMoERM) - accuracy(it). Adds a line per model to ``report.notes``; returns
    {name: {"accuracy": {category: {accuracy, pairs}}, "interval": {...}}}."""
    from dmoerm.significance import paired_bootstrap

    mine = {k: o.correct for k, o in report.outcomes.items()}
    out = {}
    for name, rewards in extra.items():
        outcomes = pair_outcomes(samples, rewards, exclude=report.identical_pairs)
        interval = paired_bootstrap(mine, {k: o.correct for k, o in outcomes.items()}, confidence=confidence,
                                    num_bootstrap=num_bootstrap, seed=seed)
        acc = accuracy_by_category(outcomes)
        out[name] = {"accuracy": acc, "interval": dataclasses.asdict(interval)}
        report.notes.append(f"{name}: overall {acc['overall']['accuracy']:.3f}; DMoERM - {name}: {interval}")
    return out


def extra_metrics(results: dict[str, dict]) -> dict[str, float]:
    """Flat MLflow names of ``compare_extra_models``' results: ``<name>/acc/<category>``, ``delta_<name>/...``."""
    m: dict[str, float] = {}
    for name, r in results.items():
        n = metric_name(name)
        m.update({f"{n}/acc/{metric_name(c)}": v["accuracy"] for c, v in r["accuracy"].items()})
        i = r["interval"]
        m.update({f"delta_{n}/overall": i["delta"], f"delta_{n}/ci_low": i["low"], f"delta_{n}/ci_high": i["high"]})
    return m


def ensemble_rewards(ensemble: RewardEnsemble, samples: Sequence[Sample]) -> dict[str, list[list[float]]]:
    """{"ensemble_<combination>": rewards per sample} for every combination, from one scoring pass."""
    return {f"ensemble_{how}": r for how, r in ensemble.score_samples_all(samples).items() if how in COMBINATIONS}
