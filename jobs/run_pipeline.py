"""The training pipeline as one Ray job: ``dmoerm.pipeline.run_pipeline`` (the stage order, written once)
with a Ray executor, then registration and promotion.

    python -m jobs.run_pipeline --config configs/demo.yaml [dotted.key=value ...]

Stages run as Ray tasks (phase 1 of every category and the baseline concurrently), every capability expert
as its own Ray Train ``TorchTrainer`` (all concurrently), the aggregator search with Ray Tune. Every stage
is idempotent: a re-run skips what is finished. The driver is the only MLflow writer (the parent run, a
child run per stage and per expert, Tune trials under their search's run).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import ray

from dmoerm import registry
from dmoerm.config import PipelineConfig, load_config
from dmoerm.pipeline import Step, open_store, run_pipeline, stage_outcome
from dmoerm.stages.phase3 import search_step
from dmoerm.stages.store import StageStore
from dmoerm.stages.train import ExpertInputs, expert_key
from dmoerm.submit import forwarded_env, withheld_env
from dmoerm.tracking import Tracker, open_tracker
from jobs.label_judge import RayLabeler
from jobs.train_experts import fit_expert
from tuning.search_aggregator import search_aggregator

REPO = Path(__file__).resolve().parents[1]


@ray.remote(num_cpus=1)
def _run_step(step: Step, cfg: PipelineConfig, store: StageStore, *args: Any) -> str:
    import torch

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO)
    return step(cfg, store, *args)


class RayExecutor:
    """``dmoerm.pipeline.Executor`` on a Ray cluster, recording every stage as an MLflow child run."""

    def __init__(self, cfg: PipelineConfig, store: StageStore, tracker: Tracker) -> None:
        self.cfg, self.store, self.tracker = cfg, store, tracker
        judge = cfg.labels.source == "judge"
        self.labeler = RayLabeler(max(1, int(ray.cluster_resources().get("CPU", 1)))) if judge else None
        self.ran: dict[str, bool] = {}
        self.experts: dict[str, dict] = {}

    def _record(self, name: str, key: str, run_id: str | None = None) -> None:
        info, self.ran[name] = stage_outcome(self.store, name, key)
        self.tracker.log_stage(name, key, info, self.ran[name], run_id)

    def run(self, step: Step, *args: Any, name: str) -> str:
        return self.run_many(step, [args], [name])[0]

    def run_many(self, step: Step, calls: list[tuple], names: list[str]) -> list[str]:
        keys = ray.get([_run_step.remote(step, self.cfg, self.store, *args) for args in calls])
        for key, name in zip(keys, names):
            self._record(name, key)
        return keys

    def train_experts(self, inputs: list[ExpertInputs]) -> list[str]:
        keys = [expert_key(self.cfg, self.store, i) for i in inputs]
        infos = ray.get([fit_expert.remote(self.cfg, self.store, i, k) for i, k in zip(inputs, keys)])
        for i, key, info in zip(inputs, keys, infos):
            name = f"experts/{i.category}/{i.capability}"
            _, self.ran[name] = stage_outcome(self.store, name, key, info)
            self.tracker.log_expert(name, key, info, self.ran[name])
            self.experts[f"{i.category}/{i.capability}"] = {k: info.get(k) for k in ("resumed_from_step", "steps",
                                                                                     "workers", "val_accuracy")}
        return keys

    def search(self, features_key: str, category: str) -> str:
        child = None

        def tune(cfg: PipelineConfig, store: StageStore, features: str, category: str) -> dict:
            nonlocal child
            child = self.tracker.child(f"search/{category}")
            return search_aggregator(cfg, store, features, category, self.tracker, child)

        key = search_step(self.cfg, self.store, features_key, category, tune)
        self._record(f"search/{category}", key, child)
        return key


def init_ray(address: str | None, num_cpus: int | None) -> None:
    """Join the submitted job's cluster, or ``address``, or start a local Ray instance.

    No secret ever goes into a ``runtime_env`` (Ray shows it in the job info): a local instance's workers
    inherit this process's environment (secrets included) from the raylet it starts, so only PYTHONPATH
    is set; a remote cluster gets the non-secret ``forwarded_env`` and its nodes must hold the secrets."""
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:  # a submitted job: its runtime env is set already
        ray.init(address=address or "auto")
    elif address:
        env = forwarded_env()
        withheld = withheld_env()
        if withheld:
            logging.getLogger(__name__).info("not forwarded to the cluster's workers (secrets; set them on its "
                                             "nodes): %s", ", ".join(withheld))
        ray.init(address=address, runtime_env={"env_vars": env} if env else None)
    else:
        path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": path}},
                 logging_level=logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"), help="Ray cluster (default: local)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray instance")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        cfg = load_config(args.config, args.overrides)
    except ValueError as e:
        print(f"run_pipeline: error: {e}", file=sys.stderr)
        return 2
    tracker = open_tracker(cfg.platform, run_name=f"{cfg.name}-{uuid.uuid4().hex[:6]}")
    store = open_store(cfg, run_id=tracker.run_id)  # before Ray starts: workers inherit the S3 endpoint
    init_ray(args.address, args.num_cpus)
    tracker.log_params(tracker.run_id, cfg)
    name, t0 = cfg.platform.registered_model or cfg.name, time.time()
    try:
        ex = RayExecutor(cfg, store, tracker)
        evaluation = run_pipeline(ex)
        report = store.get_json("evaluate", evaluation, "report.json")
        tracker.log_evaluation(report)
        version, decision = registry.register_evaluation(tracker.client, tracker.tracking_uri, tracker.run_id,
                                                         name, cfg.platform, store, evaluation)
    except BaseException:
        tracker.finish(tracker.run_id, "FAILED")
        raise
    ex.ran["register"] = not decision.get("skipped", False)
    tracker.log_metrics(tracker.run_id, {"pipeline_seconds": time.time() - t0})
    tracker.finish(tracker.run_id)
    print("\n" + report["table"])
    print(f"\nregistered {name} version {version}: "
          f"{'promoted to @' + cfg.platform.alias if decision['promote'] else 'not promoted'} - {decision['reason']}")
    print(f"MLflow run: {tracker.run_id} (experiment {cfg.platform.experiment}, tracking {tracker.tracking_uri})")
    if tracker.tracking_uri.startswith("sqlite:"):
        print(f"look at it: mlflow ui --backend-store-uri {tracker.tracking_uri}")
    print("RESULT " + json.dumps({"run_id": tracker.run_id, "version": version, "promoted": decision["promote"],
                                  "evaluation": evaluation, "ran": ex.ran, "experts": ex.experts}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
