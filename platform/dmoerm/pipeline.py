"""The DMoERM recipe, written once: the stage order as one function over an ``Executor``.

    data -> route -> labels -> trunk features -> [baseline search] -> phase 1 per category + the single-RM
    baseline -> [RM-ensemble members] -> phase 2 (every capability expert) -> per category: expert features
    -> [aggregator search] -> final aggregator -> evaluate (the bundle and the report)

The searches run when ``platform.tune.enabled``, for the baseline and every aggregator alike (one tuning
budget for both sides of the comparison); the baseline learns from every human-ranked sample DMoERM
learns from (``dmoerm.stages.budget``).

Every stage is an idempotent function ``step(cfg, store, *input_keys) -> key`` of ``dmoerm.stages``:
its outputs live in the ``StageStore`` under its key, so a finished stage is skipped and a later stage
reads what it needs from the store, wherever it runs. An executor decides only where and how each runs:
``LocalExecutor`` runs them one after the other in this process (``dmoerm train``); the Ray job's
executor (``jobs/run_pipeline.py``) runs them as Ray tasks, the experts in worker groups
(``stages.expert_groups``: each expert trained exactly as alone, so grouping changes no result) and the
search with Ray Tune. Same config and seed, same stage keys, same bundle (with the search disabled:
the two searches are different algorithms over the same space and budget, see ``stages.phase3``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from dmoerm.config import PipelineConfig
from dmoerm.progress import StageProgress
from dmoerm.stages.data import data_step
from dmoerm.stages.ensemble import train_members
from dmoerm.stages.evaluate import CategoryKeys, evaluate_step, publish_bundle
from dmoerm.stages.labels import Labeler, label_step
from dmoerm.stages.phase3 import aggregator_step, features_step
from dmoerm.stages.route import route_step
from dmoerm.stages.search import SearchTarget, search_step
from dmoerm.stages.store import StageStore
from dmoerm.stages.train import ExpertInputs, expert_step, top_step, trunk_step

logger = logging.getLogger(__name__)
Step = Callable[..., str]
"""``step(cfg, store, *args) -> key``; its outputs live under ``stages/<stage>/<key>/``."""


class Executor(Protocol):
    """Where and how the stages run. ``name`` is ``<stage>`` or ``<stage>/<part>`` (``phase1/chat``)."""

    cfg: PipelineConfig
    store: StageStore
    labeler: Labeler | None
    """How judge questions are asked (None: ``label_samples`` in the labels stage's process)."""

    def run(self, step: Step, *args: Any, name: str) -> str:
        """Run one step to completion; its key."""

    def run_many(self, step: Step, calls: list[tuple], names: list[str]) -> list[str]:
        """Run independent calls of one step (concurrently where the executor can); their keys."""

    def train_experts(self, inputs: list[ExpertInputs]) -> list[str]:
        """Phase 2: train (or skip) every expert; their keys."""

    def search(self, target: SearchTarget) -> str:
        """The search of one target (``search_step`` with this executor's search); its key."""


def run_pipeline(ex: Executor) -> str:
    """The stage order, for every executor; returns the key of the ``evaluate`` stage (bundle, report)."""
    cfg = ex.cfg
    data = ex.run(data_step, name="data")
    route = ex.run(route_step, data, name="route")
    labels = ex.run(label_step, route, ex.labeler, name="labels")
    trunk = ex.run(trunk_step, route, labels, name="trunk")
    tuned = cfg.platform.tune.enabled
    calls = [(route, trunk, c.name) for c in cfg.taxonomy]
    if cfg.baseline:
        calls.append((route, trunk, None, labels,
                      ex.search(SearchTarget.baseline(route, labels, trunk)) if tuned else None))
    tops = dict(zip([c[2] for c in calls],
                    ex.run_many(top_step, calls, [f"phase1/{c[2]}" if c[2] else "baseline" for c in calls])))
    base_search = calls[-1][4] if cfg.baseline else None  # the baseline's call carries its search key last
    members = train_members(ex, route, labels, trunk, base_search) if cfg.ensemble.members else []
    inputs = [ExpertInputs(route, labels, trunk, tops[c.name], c.name, cap)
              for c in cfg.taxonomy for cap in c.capabilities]
    experts = dict(zip(((i.category, i.capability) for i in inputs), ex.train_experts(inputs)))
    categories = {}
    for c in cfg.taxonomy:
        keys = {cap: experts[(c.name, cap)] for cap in c.capabilities}
        feats = ex.run(features_step, route, trunk, tops[c.name], keys, c.name, name=f"features/{c.name}")
        search = ex.search(SearchTarget.aggregator(feats, c.name)) if tuned else None
        agg = ex.run(aggregator_step, feats, search, name=f"aggregator/{c.name}")
        categories[c.name] = CategoryKeys(tops[c.name], keys, agg)
    return ex.run(evaluate_step, data, route, labels, categories, tops.get(None), members, name="evaluate")


def stage_outcome(store: StageStore, name: str, key: str, info: dict | None = None) -> tuple[dict, bool]:
    """A finished stage's DONE info (or ``info``) and whether this run did it (else an earlier run did and
    this one skipped it), logged as one line."""
    info = (store.done(name.split("/")[0], key) or {}) if info is None else info
    ran = info.get("run") == store.run_id
    logger.info("%-28s %s (%s)", name, "done" if ran else "skipped: finished earlier", key)
    return info, ran


@dataclass
class LocalExecutor:
    """Every stage in this process, one after the other; what each did and how long it took."""

    cfg: PipelineConfig
    store: StageStore
    labeler: Labeler | None = None
    timings: dict[str, float] = field(default_factory=dict)
    ran: dict[str, bool] = field(default_factory=dict)
    progress: StageProgress = field(default_factory=lambda: StageProgress(enabled=False))

    def run(self, step: Step, *args: Any, name: str) -> str:
        t0 = time.perf_counter()
        self.progress.start(name)
        try:
            key = step(self.cfg, self.store, *args)
        except BaseException:
            self.progress.finish(name, "failed", time.perf_counter() - t0)
            raise
        self.timings[name] = round(time.perf_counter() - t0, 2)
        _, self.ran[name] = stage_outcome(self.store, name, key)
        self.progress.finish(name, "done" if self.ran[name] else "skipped", self.timings[name])
        return key

    def run_many(self, step: Step, calls: list[tuple], names: list[str]) -> list[str]:
        return [self.run(step, *args, name=n) for args, n in zip(calls, names)]

    def train_experts(self, inputs: list[ExpertInputs]) -> list[str]:
        return [self.run(expert_step, i, name=f"experts/{i.category}/{i.capability}") for i in inputs]

    def search(self, target: SearchTarget) -> str:
        return self.run(search_step, target, name=target.name)


@dataclass
class LocalRun:
    """What ``dmoerm train`` reports."""

    evaluation: str
    report: dict
    bundle_uri: str
    timings: dict[str, float]
    ran: dict[str, bool]
    """Stage name -> whether this run did it (False: finished by an earlier run, skipped)."""


def train_locally(cfg: PipelineConfig, progress: StageProgress | None = None) -> LocalRun:
    """The whole recipe in this process on ``platform.storage_uri``; the bundle is also copied to
    ``<output_dir>/bundle``. ``progress``: where each stage's start and end are shown (default: nowhere)."""
    import uuid

    from dmoerm.storage import join_uri

    store = open_store(cfg, run_id=f"local-{uuid.uuid4().hex[:12]}")
    ex = LocalExecutor(cfg, store, progress=progress or StageProgress(enabled=False))
    evaluation = run_pipeline(ex)
    uri = publish_bundle(store, evaluation, join_uri(cfg.output_dir, "bundle"))
    return LocalRun(evaluation, store.get_json("evaluate", evaluation, "report.json"), uri, ex.timings, ex.ran)


def open_store(cfg: PipelineConfig, run_id: str = "") -> StageStore:
    """The run's store at ``platform.storage_uri`` (already resolved by ``load_config``). A configured
    ``platform.s3_endpoint_url`` becomes ``AWS_ENDPOINT_URL``, so every S3 client of the run (the store's,
    the loaders', Ray Train's and Tune's) reaches the same endpoint."""
    import os

    if cfg.platform.s3_endpoint_url:
        os.environ["AWS_ENDPOINT_URL"] = cfg.platform.s3_endpoint_url
    return StageStore(cfg.platform.storage_uri, run_id=run_id)
