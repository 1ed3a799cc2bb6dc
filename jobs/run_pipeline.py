"""The training pipeline as one Ray job: ``dmoerm.pipeline.run_pipeline`` (the stage order, written once)
with a Ray executor, then registration and promotion.

    python -m jobs.run_pipeline --config configs/demo.yaml [dotted.key=value ...]

Stages run as Ray tasks (phase 1 of every category and the baseline concurrently), the capability experts
in worker groups (``jobs.train_experts``: a Ray Train ``TorchTrainer`` per large expert, the small ones packed
into plain tasks, all concurrently), the searches (the baseline's and every aggregator's) with Ray Tune.
Every stage is idempotent: a re-run skips what is finished. The driver is the only MLflow writer (the parent
run, a child run per stage and per expert, Tune trials under their search's run).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import ray

from dmoerm import registry
from dmoerm.config import PipelineConfig, load_config
from dmoerm.pipeline import Step, open_store, run_pipeline, stage_outcome
from dmoerm.progress import StageProgress
from dmoerm.redact import redact_credentials
from dmoerm.runlog import LOG_LEVEL_ENV, log_dir, log_level, log_to_file
from dmoerm.stages.expert_groups import expert_slots, plan_expert_groups
from dmoerm.stages.search import SearchTarget, search_step
from dmoerm.stages.store import StageStore
from dmoerm.stages.train import ExpertInputs, expert_key
from dmoerm.tracking import Tracker, open_tracker
from jobs.connect_ray import init_ray
from jobs.label_judge import RayLabeler
from jobs.train_experts import each_expert, launch_expert_groups
from tuning.search_hparams import search_hparams


@ray.remote(num_cpus=1)
def _run_step(step: Step, cfg: PipelineConfig, store: StageStore, *args: Any) -> str:
    import torch

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO)
    return step(cfg, store, *args)


class RayExecutor:
    """``dmoerm.pipeline.Executor`` on a Ray cluster, recording every stage as an MLflow child run."""

    def __init__(self, cfg: PipelineConfig, store: StageStore, tracker: Tracker,
                 progress: StageProgress | None = None) -> None:
        self.cfg, self.store, self.tracker = cfg, store, tracker
        self.progress = progress or StageProgress(enabled=False)
        judge = cfg.labels.source == "judge"
        self.labeler = RayLabeler(max(1, int(ray.cluster_resources().get("CPU", 1)))) if judge else None
        self.ran: dict[str, bool] = {}
        self.experts: dict[str, dict] = {}

    def _record(self, name: str, key: str, run_id: str | None = None) -> None:
        info, self.ran[name] = stage_outcome(self.store, name, key)
        self.tracker.log_stage(name, key, info, self.ran[name], run_id)

    def run(self, step: Step, *args: Any, name: str) -> str:
        return self.run_many(step, [args], [name])[0]

    def _wait_each(self, refs: list, names: list[str], on_done: Callable[[int, Any], None]) -> list:
        """Wait for concurrent tasks one by one as they finish, each shown as its own stage (under one group
        bar); ``on_done(i, result)`` records the i-th before its stage is marked done or skipped."""
        group = " + ".join(dict.fromkeys(n.split("/")[0] for n in names)) if len(names) > 1 else None
        t0 = time.monotonic()
        for name in names:
            self.progress.start(name, group)
        results, todo = [None] * len(refs), {ref: i for i, ref in enumerate(refs)}
        while todo:
            [ref], _ = ray.wait(list(todo), num_returns=1)
            i = todo.pop(ref)
            try:
                results[i] = ray.get(ref)
                on_done(i, results[i])
            except BaseException:
                self.progress.finish(names[i], "failed", time.monotonic() - t0)
                raise
            self.progress.finish(names[i], "done" if self.ran[names[i]] else "skipped", time.monotonic() - t0)
        return results

    def run_many(self, step: Step, calls: list[tuple], names: list[str]) -> list[str]:
        refs = [_run_step.remote(step, self.cfg, self.store, *args) for args in calls]
        return self._wait_each(refs, names, lambda i, key: self._record(names[i], key))

    def train_experts(self, inputs: list[ExpertInputs]) -> list[str]:
        keys = [expert_key(self.cfg, self.store, i) for i in inputs]
        names = [f"experts/{i.category}/{i.capability}" for i in inputs]

        def record(n: int, info: dict) -> None:
            name, i = names[n], inputs[n]
            _, self.ran[name] = stage_outcome(self.store, name, keys[n], info)
            self.tracker.log_expert(name, keys[n], info, self.ran[name])
            self.experts[f"{i.category}/{i.capability}"] = {k: info.get(k) for k in (
                "resumed_from_step", "steps", "workers", "val_accuracy", "node_id", "group", "train_seconds")}

        self._wait_experts(inputs, keys, names, record)
        return keys

    def _wait_experts(self, inputs: list[ExpertInputs], keys: list[str], names: list[str],
                      record: Callable[[int, dict], None]) -> None:
        """Phase 2 in worker groups (``platform.expert_resources.group``), every expert shown as its own stage
        as it finishes, whichever group it is in; finished experts are skipped without starting a group."""
        group = "experts" if len(names) > 1 else None
        t0 = time.monotonic()
        for name in names:
            self.progress.start(name, group)
        left, index = dict(enumerate(keys)), {k: n for n, k in enumerate(keys)}

        def finish(n: int, info: dict) -> None:
            record(n, info)
            self.progress.finish(names[n], "done" if self.ran[names[n]] else "skipped", time.monotonic() - t0)
            del left[n]

        try:
            for n, key in list(left.items()):
                if (done := self.store.done("experts", key)) is not None:
                    finish(n, {**done, "key": key})
            slots = expert_slots(self.cfg.platform.expert_resources, ray.cluster_resources())
            groups = plan_expert_groups(self.cfg, self.store, [inputs[n] for n in left], list(left.values()), slots)
            logging.getLogger(__name__).info("phase 2: %d experts in %d worker groups: %s", len(left), len(groups),
                                             "; ".join(f"{g.name} ({'trainer' if g.trainer else 'task'}, "
                                                       f"{len(g.experts)} experts)" for g in groups))
            for info in each_expert(launch_expert_groups(self.cfg, self.store, groups)):
                finish(index[info["key"]], info)
            if left:
                raise RuntimeError(f"phase 2 ended without experts {[names[n] for n in left]}")
        except BaseException:
            for n in left:
                self.progress.finish(names[n], "failed", time.monotonic() - t0)
            raise

    def search(self, target: SearchTarget) -> str:
        child = None

        def tune(cfg: PipelineConfig, store: StageStore, target: SearchTarget) -> dict:
            nonlocal child
            child = self.tracker.child(target.name)
            return search_hparams(cfg, store, target, self.tracker, child)

        t0 = time.monotonic()
        self.progress.start(target.name)
        try:
            key = search_step(self.cfg, self.store, target, tune)
            self._record(target.name, key, child)
        except BaseException:
            self.progress.finish(target.name, "failed", time.monotonic() - t0)
            raise
        self.progress.finish(target.name, "done" if self.ran[target.name] else "skipped", time.monotonic() - t0)
        return key


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"), help="Ray cluster (default: local)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray instance")
    p.add_argument("--verbose", action="store_true",
                   help=f"every log line on the terminal too (Ray's and the workers'); or set {LOG_LEVEL_ENV}=DEBUG")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        _, loud = log_level(args.verbose)
    except ValueError as e:
        print(f"run_pipeline: error: {e}", file=sys.stderr)
        return 2
    run_name = f"{cfg.name}-{uuid.uuid4().hex[:6]}"
    log_path = (log_dir(cfg.platform.storage_uri, cfg.output_dir) / f"{run_name}.log").resolve()
    if not loud:
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # the workers' lines reach the log file uncoloured
    with log_to_file(log_path, args.verbose) as terminal:
        print(f"log (this job's, Ray's and its workers'): {log_path}", file=terminal, flush=True)
        try:
            # With the log lines on the terminal too, the progress is plain lines between them, never redrawn.
            return _run(cfg, args, run_name, StageProgress(terminal, live=False if loud else None))
        except BaseException:
            print(f"run_pipeline: failed; the whole log is in {log_path}", file=terminal, flush=True)
            raise
        finally:
            ray.shutdown()  # inside the redirect: what Ray prints while it stops goes to the log too


def _run(cfg: PipelineConfig, args: argparse.Namespace, run_name: str, progress: StageProgress) -> int:
    """The job in ``log_to_file``'s redirect: the stage progress and the results go to ``progress.stream``."""
    tracker = open_tracker(cfg.platform, run_name=run_name)
    store = open_store(cfg, run_id=tracker.run_id)  # before Ray starts: workers inherit the S3 endpoint
    init_ray(args.address, args.num_cpus)
    logging.getLogger("ray").setLevel(logging.INFO)  # Ray's own INFO lines: to the log
    tracker.log_params(tracker.run_id, cfg)
    name, t0 = cfg.platform.registered_model or cfg.name, time.time()
    try:
        with progress:
            ex = RayExecutor(cfg, store, tracker, progress)
            evaluation = run_pipeline(ex)
            report = store.get_json("evaluate", evaluation, "report.json")
            tracker.log_evaluation(report)
            progress.start("register")
            version, decision = registry.register_evaluation(tracker.client, tracker.tracking_uri, tracker.run_id,
                                                             name, cfg.platform, store, evaluation)
            ex.ran["register"] = not decision.get("skipped", False)
            progress.finish("register", "done" if ex.ran["register"] else "skipped")
    except BaseException:
        tracker.finish(tracker.run_id, "FAILED")
        raise
    tracker.log_metrics(tracker.run_id, {"pipeline_seconds": time.time() - t0})
    tracker.finish(tracker.run_id)
    out = functools.partial(print, file=progress.stream)
    out(f"\nDMoERM vs single RM, pairwise accuracy on held-out test pairs ({cfg.name}):")
    out(report["table"])
    out(f"\nregistered {name} version {version}: "
        f"{'promoted to @' + cfg.platform.alias if decision['promote'] else 'not promoted'} - {decision['reason']}")
    out(f"MLflow run: {tracker.run_id} (experiment {cfg.platform.experiment}, "
        f"tracking {redact_credentials(tracker.tracking_uri)})")
    if tracker.tracking_uri.startswith("sqlite:"):
        out(f"look at it: mlflow ui --backend-store-uri {redact_credentials(tracker.tracking_uri)}")
    out("RESULT " + json.dumps({"run_id": tracker.run_id, "version": version, "promoted": decision["promote"],
                                "evaluation": evaluation, "ran": ex.ran, "experts": ex.experts}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
