"""The data-scaling study ("Does RLHF Scale?", DESIGN.md §3): held-out pairwise accuracy of DMoERM and the
single RM versus the amount of training data (a fraction of it) and its diversity (how many task
categories are included).

One trial = one ``Subset`` (fraction f, the first c categories of the taxonomy, a seed):

- **Shared stages, once.** ``prepare_shared`` runs ``data``, ``route``, ``labels`` and ``trunk`` on the
  whole config (every category, every row) before any trial. Every trial's training rows are a subset of
  those rows, so every trial reads the one trunk cache (``trunk_cache`` looks rows up by content).
- **The trial's own stages.** ``StudyExecutor`` runs ``run_pipeline``'s stage order unchanged but answers
  ``data`` and ``trunk`` with the shared keys and replaces ``route`` and ``labels`` by their subsets
  (``subset_route_step``: the kept phase-1/phase-3 samples and a router trained on them;
  ``subset_label_step``: the kept capability labels of the included categories), stored under keys of
  their own; phase 1, the experts, the aggregators, the single RM and ``evaluate`` then run as in
  ``dmoerm train``, keyed as always, so a re-run skips every finished trial.
- **What is kept.** A training sample (phase 1, phase 3, every capability label file) is kept when
  ``u(seed, id) < f`` (a seeded hash of its id), so the same sample is in or out everywhere and the 25%
  subset lies inside the 50% one. Only the included categories' samples and label files are kept; a
  capability listed by several categories keeps its label sources for each. The single RM learns from
  exactly the kept samples DMoERM learns from (``stages.budget``). Validation and test are never
  subsampled: the test set of a trial is the full test split of its included categories, so a category's
  column is measured on the same pairs in every trial (``overall`` covers the included categories).
- **Intervals.** Per trial, a percentile bootstrap over test samples (``significance.paired_bootstrap``
  against an all-wrong model is exactly that for one accuracy) and the paired bootstrap of the DMoERM -
  single RM difference; with several seeds, a t interval over the seeds' accuracies instead.

Ray-free; ``tuning/study_scaling.py`` runs the trials as a Ray Tune grid. Reports: ``studies.scaling_report``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

from dmoerm.config import PipelineConfig
from dmoerm.data.records import Sample
from dmoerm.data.splits import SPLITS, hash_order
from dmoerm.pipeline import LocalExecutor, Step, run_pipeline
from dmoerm.stages.base import backbone_for, model_id
from dmoerm.stages.data import data_step, splits_of
from dmoerm.stages.labels import label_step
from dmoerm.stages.route import route_step, train_router_on
from dmoerm.stages.store import StageStore
from dmoerm.stages.train import trunk_step

logger = logging.getLogger(__name__)
TRAIN_SPLITS = ("phase1", "phase3")
"""The route stage's splits a fraction thins out (validation and test are never subsampled)."""


@dataclass
class ScalingConfig:
    """The ``study:`` section of a scaling-study config (the rest of the file is a pipeline config)."""

    fractions: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0])
    """Shares of each included category's training samples (phase 1, phase 3, capability labels), in (0, 1]."""
    num_categories: list[int] = field(default_factory=lambda: [1, 2])
    """How many categories to include: the first c of the taxonomy, each at least 1."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """One trial per seed (subset draw and training); several give intervals over seeds."""
    confidence: float = 0.95
    """Two-sided interval level."""
    num_bootstrap: int = 1000
    """Bootstrap resamples of the test samples, per interval."""
    max_concurrent: int = 2
    """Trials running at once (Ray Tune)."""
    cpus_per_trial: float = 1.0
    """CPUs each trial reserves (also its torch thread count, rounded down, at least 1)."""

    def __post_init__(self) -> None:
        if not self.fractions or any(not 0 < f <= 1 for f in self.fractions):
            raise ValueError(f"study.fractions: values in (0, 1] are required, got {self.fractions}")
        if not self.num_categories or any(c < 1 for c in self.num_categories):
            raise ValueError(f"study.num_categories: values >= 1 are required, got {self.num_categories}")
        if not self.seeds:
            raise ValueError("study.seeds: give at least one seed")
        if not 0 < self.confidence < 1 or self.num_bootstrap < 1 or self.max_concurrent < 1:
            raise ValueError("study: confidence in (0, 1), num_bootstrap >= 1 and max_concurrent >= 1 are required")
        if self.cpus_per_trial <= 0:
            raise ValueError(f"study.cpus_per_trial must be > 0, got {self.cpus_per_trial}")

    def check(self, cfg: PipelineConfig) -> None:
        """ValueError when a count exceeds the taxonomy."""
        too_many = [c for c in self.num_categories if c > len(cfg.taxonomy)]
        if too_many:
            raise ValueError(f"study.num_categories: {too_many} exceed the taxonomy's {len(cfg.taxonomy)} categories "
                             f"({[c.name for c in cfg.taxonomy]})")


def load_study_config(path: str, overrides: list[str] | None = None) -> tuple[PipelineConfig, ScalingConfig]:
    """A scaling-study YAML: a pipeline config (as ``dmoerm train`` reads it, paths resolved beside the
    file) plus a ``study:`` section; dotted overrides reach either (``study.fractions=[0.5,1.0]``)."""
    from pathlib import Path

    from dmoerm.config import _resolve, _resolve_inputs, load_config
    from dmoerm.configtools import apply_overrides, from_dict, load_yaml

    raw = apply_overrides(load_yaml(path), overrides or [])
    study = from_dict(ScalingConfig, raw.pop("study", None) or {}, "study")
    cfg = load_config(data=raw)
    _resolve_inputs(cfg, Path(path).resolve().parent)  # what load_config(path) does for a plain pipeline file
    cfg.output_dir = _resolve(cfg.output_dir, Path.cwd())
    study.check(cfg)
    return shared_config(cfg), study


@dataclass(frozen=True)
class Subset:
    """One trial's training data: ``fraction`` of the first ``num_categories`` categories' samples."""

    fraction: float
    num_categories: int
    seed: int

    def categories(self, cfg: PipelineConfig) -> list[str]:
        return [c.name for c in cfg.taxonomy[: self.num_categories]]


def keep(sample: Sample, fraction: float, seed: int) -> bool:
    """Whether a training sample is in the ``fraction`` subset: the same answer wherever the sample appears,
    and every sample of a smaller fraction is in every larger one (same seed)."""
    return fraction >= 1 or int(hash_order(seed, "scaling:" + sample.id)[:8], 16) / 0xFFFFFFFF < fraction


def subset_splits(splits: dict[str, list[Sample]], subset: Subset, categories: list[str]) -> dict[str, list[Sample]]:
    """The included categories' splits, the training ones thinned to the subset's fraction; ValueError
    naming the split and category left without samples."""
    out = {}
    for name in SPLITS:
        mine = [s for s in splits[name] if s.category in categories]
        if name in TRAIN_SPLITS:
            mine = [s for s in mine if keep(s, subset.fraction, subset.seed)]
        for cat in categories:
            if not any(s.category == cat for s in mine):
                raise ValueError(f"study subset {subset}: split {name!r} has no sample of category {cat!r}; "
                                 f"raise the smallest study.fractions value or data.max_samples_per_category")
        out[name] = mine
    return out


def trial_config(cfg: PipelineConfig, subset: Subset) -> PipelineConfig:
    """``cfg`` restricted to the subset's categories (taxonomy, data sources, label datasets), trained with
    the subset's seed, without a search (a trial is one training of each model)."""
    names = subset.categories(cfg)
    caps = {cap for c in cfg.taxonomy[: subset.num_categories] for cap in c.capabilities}
    sources = [dataclasses.replace(s, category_map={k: v for k, v in s.category_map.items() if v in names})
               for s in cfg.data.sources if s.category is None or s.category in names]
    return dataclasses.replace(
        cfg, seed=subset.seed, taxonomy=list(cfg.taxonomy[: subset.num_categories]),
        data=dataclasses.replace(cfg.data, sources=sources),
        labels=dataclasses.replace(cfg.labels, datasets={k: v for k, v in cfg.labels.datasets.items() if k in caps}),
        platform=dataclasses.replace(cfg.platform, tune=dataclasses.replace(cfg.platform.tune, enabled=False)))


def shared_config(cfg: PipelineConfig) -> PipelineConfig:
    """The config of the shared stages: the whole taxonomy, no search inside the study."""
    return dataclasses.replace(cfg, platform=dataclasses.replace(
        cfg.platform, tune=dataclasses.replace(cfg.platform.tune, enabled=False)))


# ---- the subset stages ------------------------------------------------------------------------------
def subset_route_step(cfg: PipelineConfig, store: StageStore, shared_route: str, subset: Subset) -> str:
    """A route-stage folder for the subset: its splits and a router trained on its phase-1/phase-3
    contexts (the router, too, sees only the subset's data and categories)."""
    key = store.key(shared_route=shared_route, subset=subset, model=model_id(cfg), router=cfg.router,
                    taxonomy=cfg.taxonomy, seed=cfg.seed)
    if store.done("route", key) is None:
        from dmoerm.bundle import save_tensors

        splits = subset_splits(splits_of(store, "route", shared_route), subset, subset.categories(cfg))
        router, metrics = train_router_on(backbone_for(cfg), splits, cfg)
        for name, part in splits.items():
            store.put_samples("route", key, f"{name}.jsonl", part)
        save_tensors(router.state_dict(), store.local("route", key) / "router.safetensors")
        store.mark_done("route", key, {**metrics, "subset_of": shared_route,
                                       "samples": {n: len(p) for n, p in splits.items()}})
    return key


def subset_label_step(cfg: PipelineConfig, store: StageStore, shared_labels: str, route_key: str,
                      subset: Subset) -> str:
    """A labels-stage folder for the subset: the included categories' label files, each thinned to the
    subset's fraction (the same ``keep`` as the splits)."""
    key = store.key(shared_labels=shared_labels, route=route_key, subset=subset)
    if store.done("labels", key) is None:
        names = set(subset.categories(cfg))
        index = []
        for entry in store.get_json("labels", shared_labels, "index.json"):
            if entry["category"] not in names:
                continue
            kept = [s for s in store.get_samples("labels", shared_labels, entry["file"])
                    if keep(s, subset.fraction, subset.seed)]
            store.put_samples("labels", key, entry["file"], kept)
            index.append({**entry, "n": len(kept)})
        empty = [f"{e['category']}/{e['capability']}" for e in index if e["part"] == "train" and not e["n"]]
        if empty:
            raise ValueError(f"study subset {subset}: no capability label left to train expert(s) {empty}; raise "
                             f"the smallest study.fractions value or labels.max_samples_per_capability")
        store.put_json("labels", key, "index.json", index)
        store.mark_done("labels", key, {"subset_of": shared_labels, "files": len(index)})
    return key


def shared_trunk_step(cfg: PipelineConfig, store: StageStore, shared_trunk: str) -> str:
    """The shared trunk stage's key (it holds every row a trial trains on); ValueError if it is not done."""
    if store.done("trunk", shared_trunk) is None:
        raise ValueError(f"the study's shared trunk stage {shared_trunk} is not done; run prepare_shared first")
    return shared_trunk


@dataclass(frozen=True)
class SharedKeys:
    """The keys of the stages every trial shares."""

    data: str
    route: str
    labels: str
    trunk: str


def prepare_shared(cfg: PipelineConfig, store: StageStore) -> tuple[SharedKeys, dict[str, bool]]:
    """``data``, ``route``, ``labels`` and ``trunk`` on the whole config, once for every trial; their keys
    and which of them this call ran (the rest were finished earlier)."""
    ex = LocalExecutor(cfg, store)
    data = ex.run(data_step, name="data")
    route = ex.run(route_step, data, name="route")
    labels = ex.run(label_step, route, None, name="labels")
    trunk = ex.run(trunk_step, route, labels, name="trunk")
    return SharedKeys(data, route, labels, trunk), dict(ex.ran)


@dataclass
class StudyExecutor(LocalExecutor):
    """``LocalExecutor`` for one trial: ``data`` and ``trunk`` are the shared stages, ``route`` and
    ``labels`` the subset's; every other stage runs as in ``dmoerm train``."""

    shared: SharedKeys | None = None
    subset: Subset | None = None

    def run(self, step: Step, *args: Any, name: str) -> str:
        if self.shared is None or self.subset is None:
            raise ValueError("StudyExecutor needs the shared stage keys and the trial's subset")
        if step is data_step:
            return super().run(lambda cfg, store: self.shared.data, name=name)
        if step is route_step:
            return super().run(subset_route_step, self.shared.route, self.subset, name=name)
        if step is label_step:
            return super().run(subset_label_step, self.shared.labels, args[0], self.subset, name=name)
        if step is trunk_step:
            return super().run(shared_trunk_step, self.shared.trunk, name=name)
        return super().run(step, *args, name=name)


# ---- one trial ---------------------------------------------------------------------------------------
def accuracy_interval(outcomes: dict[str, bool], confidence: float, num_bootstrap: int, seed: int
                      ) -> dict[str, float]:
    """Accuracy over pairs with a percentile bootstrap interval resampling samples (clusters of pairs):
    the paired bootstrap against an all-wrong model is exactly that."""
    from dmoerm.significance import paired_bootstrap

    iv = paired_bootstrap(outcomes, dict.fromkeys(outcomes, False), confidence=confidence,
                          num_bootstrap=num_bootstrap, seed=seed)
    return {"accuracy": iv.delta, "low": iv.low, "high": iv.high, "pairs": iv.num_pairs}


def trial_metrics(dmoerm: dict[str, dict], single: dict[str, dict], study: ScalingConfig, seed: int = 0
                  ) -> dict[str, dict]:
    """Per category and ``overall``: each model's accuracy and interval and the paired difference.
    ``dmoerm``/``single``: pair id -> ``[category, correct]`` (``evaluate``'s outcome files)."""
    from dmoerm.significance import paired_bootstrap

    cats = sorted({o[0] for o in dmoerm.values()}) + ["overall"]
    out = {}
    for cat in cats:
        d = {k: bool(o[1]) for k, o in dmoerm.items() if cat in ("overall", o[0])}
        s = {k: bool(single[k][1]) for k in d}
        iv = paired_bootstrap(d, s, confidence=study.confidence, num_bootstrap=study.num_bootstrap, seed=seed)
        out[cat] = {"dmoerm": accuracy_interval(d, study.confidence, study.num_bootstrap, seed),
                    "single": accuracy_interval(s, study.confidence, study.num_bootstrap, seed),
                    "delta": {"value": iv.delta, "low": iv.low, "high": iv.high}}
    return out


def run_trial(cfg: PipelineConfig, store: StageStore, shared: SharedKeys, subset: Subset, study: ScalingConfig
              ) -> dict:
    """Train and evaluate both models on ``subset``; its accuracies, the data each learnt from, and which
    stages this call ran (none when an earlier run finished the trial)."""
    tcfg = trial_config(cfg, subset)
    store = copy.copy(store)  # the trial's own run id: the shared stages read as "finished earlier" in it
    store.run_id = f"{store.run_id}/f{subset.fraction:g}-c{subset.num_categories}-s{subset.seed}"
    if not tcfg.baseline:
        raise ValueError("the scaling study compares with the single RM: set baseline: true")
    ex = StudyExecutor(tcfg, store, shared=shared, subset=subset)
    evaluation = run_pipeline(ex)
    report = store.get_json("evaluate", evaluation, "report.json")
    dmoerm = store.get_json("evaluate", evaluation, "pair_outcomes.json")
    single = store.get_json("evaluate", evaluation, "baseline_pair_outcomes.json")
    budgets = report["budgets"]
    return {"subset": dataclasses.asdict(subset), "categories": subset.categories(cfg), "evaluation": evaluation,
            "metrics": trial_metrics(dmoerm, single, study, seed=subset.seed),
            "train_samples": {"dmoerm": budgets["dmoerm"]["samples"], "single": budgets["baseline"]["samples"]},
            "test_pairs": budgets["test"]["pairs"], "trunk": shared.trunk,
            "stages_ran": sorted(n for n, r in ex.ran.items() if r), "timings": ex.timings}
