"""The training pipeline as one Ray job:

    route -> label -> trunk features -> phase 1 (per category) + baseline -> phase 2 (every expert its own
    TorchTrainer, all concurrently) -> expert features -> aggregator search (Tune) -> final aggregator ->
    evaluate -> register -> promote

    python -m jobs.run_pipeline --config configs/demo.yaml [dotted.key=value ...]

Every stage is idempotent (dmoerm.stages): a re-run skips what is finished. The driver is the only
MLflow writer (parent run, a child run per stage and per expert, Tune trials under the search's run).
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

import ray

from dmoerm.config import PipelineConfig, load_config
from dmoerm.stages import steps
from dmoerm.stages.store import StageStore
from dmoerm.tracking import Tracker, default_tracking_uri, plot_accuracy, plot_confusion, plot_history

logger = logging.getLogger("dmoerm.jobs")
REPO = Path(__file__).resolve().parents[1]


@ray.remote(num_cpus=1)
def _stage(fn: str, cfg: PipelineConfig, storage: str, run_id: str, *args, **kwargs) -> str:
    import torch

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO)
    return getattr(steps, fn)(cfg, StageStore(storage, run_id=run_id), *args, **kwargs)


class Pipeline:
    def __init__(self, cfg: PipelineConfig, tracker: Tracker, fail_expert: str | None = None) -> None:
        self.cfg, self.tracker = cfg, tracker
        self.storage = cfg.platform.storage_uri
        self.run_id = tracker.run_id
        self.store = StageStore(self.storage, run_id=self.run_id)
        self.fail_expert = fail_expert  # "category/capability:step": that expert's worker dies once there
        self.ran: dict[str, bool] = {}

    def _record(self, stage: str, key: str, name: str | None = None, params: dict | None = None) -> dict:
        """A child run per stage: its key, whether this run did it or skipped it, its figures."""
        info = self.store.done(stage, key) or {}
        ran = info.get("run") == self.run_id
        label = name or stage
        self.ran[label] = ran
        child = self.tracker.child(label, {"stage": stage, "key": key, "skipped": str(not ran), **(params or {})})
        self.tracker.log_metrics(child, {k: v for k, v in info.items() if isinstance(v, (int, float))})
        self.tracker.finish(child)
        logger.info("%-28s %s (%s)", label, "done" if ran else "skipped: finished earlier", key)
        return info

    def stage(self, fn: str, stage: str, *args, name: str | None = None, **kwargs) -> str:
        key = ray.get(_stage.remote(fn, self.cfg, self.storage, self.run_id, *args, **kwargs))
        self._record(stage, key, name)
        return key

    def run(self) -> dict:
        from jobs.train_experts import fit_expert

        cfg, taxonomy = self.cfg, self.cfg.taxonomy
        data = self.stage("data_step", "data")
        route = self.stage("route_step", "route", data)
        labeler = None
        if cfg.labels.source == "judge":
            from jobs.label_judge import ray_labeler

            labeler = ray_labeler(max(1, int(ray.cluster_resources().get("CPU", 1))))
            labels = steps.label_step(cfg, self.store, route, labeler=labeler)  # driver: fans out itself
            self._record("labels", labels)
        else:
            labels = self.stage("label_step", "labels", route)
        trunk = self.stage("trunk_step", "trunk", route, labels)

        # phase 1 per category and the baseline, concurrently
        names = [c.name for c in taxonomy] + ([None] if cfg.baseline else [])
        futures = [_stage.remote("top_step", cfg, self.storage, self.run_id, route, trunk, n) for n in names]
        tops = dict(zip(names, ray.get(futures)))
        for n, k in tops.items():
            self._record("phase1" if n else "baseline", k, f"phase1/{n}" if n else "baseline")

        # phase 2: every expert of every category, each its own TorchTrainer, concurrently
        expert_jobs = {}
        for c in taxonomy:
            for cap in c.capabilities:
                inputs = steps.ExpertInputs(route, labels, trunk, tops[c.name], c.name, cap)
                key = steps.expert_key(cfg, self.store, inputs)
                fail_at = None
                if self.fail_expert and self.fail_expert.rsplit(":", 1)[0] == f"{c.name}/{cap}":
                    fail_at = int(self.fail_expert.rsplit(":", 1)[1])
                expert_jobs[(c.name, cap)] = (key, fit_expert.remote(cfg, self.storage, self.run_id, inputs, key,
                                                                      fail_at))
        experts = {}
        self.expert_info = {}
        for (cat, cap), (key, fut) in expert_jobs.items():
            info = ray.get(fut)
            experts[(cat, cap)] = key
            self.expert_info[f"{cat}/{cap}"] = {k: info.get(k) for k in ("resumed_from_step", "steps", "workers",
                                                                           "val_accuracy")}
            self._log_expert(cat, cap, key, info)

        # phase 3: features once, aggregator search on them, final aggregator
        cat_keys = {}
        for c in taxonomy:
            ek = {cap: experts[(c.name, cap)] for cap in c.capabilities}
            feats = self.stage("features_step", "features", route, trunk, tops[c.name], ek, c.name,
                               name=f"features/{c.name}")
            spec, settings = self._search(c.name, feats)
            agg = self.stage("aggregator_step", "aggregator", feats, spec, settings, name=f"aggregator/{c.name}")
            cat_keys[c.name] = steps.CategoryKeys(tops[c.name], ek, agg)
        evaluation = self.stage("evaluate_step", "evaluate", route, cat_keys, tops.get(None))
        return self._finish(evaluation)

    def _log_expert(self, cat: str, cap: str, key: str, info: dict) -> None:
        ran = info.get("run") == self.run_id
        self.ran[f"expert/{cat}/{cap}"] = ran
        child = self.tracker.child(f"expert/{cat}/{cap}", {"stage": "experts", "key": key, "skipped": str(not ran),
                                                            "workers": str(info.get("workers"))})
        metrics = info.get("metrics") or {}
        for step, value in metrics.get("train_loss", []):
            self.tracker.log_metrics(child, {"train_loss": value}, int(step))
        for step, value in metrics.get("val_accuracy", []):
            self.tracker.log_metrics(child, {"val_accuracy": value}, int(step))
        self.tracker.log_metrics(child, {k: info[k] for k in ("val_accuracy", "resumed_from_step", "seconds")
                                         if isinstance(info.get(k), (int, float))})
        if metrics.get("history"):
            self.tracker.log_figure(child, plot_history(metrics["history"], f"{cat}/{cap}"), "training_curve.png")
        self.tracker.finish(child)
        logger.info("%-28s %s (%s)", f"expert/{cat}/{cap}", "done" if ran else "skipped: finished earlier", key)

    def _search(self, category: str, features_key: str):
        """Search once per features key (the result is stored), then the final aggregator's settings."""
        from dmoerm.modeling.aggregator import AggregatorSpec
        from dmoerm.training.loop import TrainSettings
        from tuning.search_aggregator import search_aggregator, trial_settings

        tune_cfg = self.cfg.platform.tune
        key = self.store.key(features=features_key, tune=tune_cfg, seed=self.cfg.seed)
        if self.store.done("search", key) is None:
            child = self.tracker.child(f"search/{category}", {"stage": "search", "key": key})
            best = search_aggregator(self.cfg, self.storage, features_key, category, self.tracker.tracking_uri,
                                     self._experiment_name(), child)
            self.tracker.log_metrics(child, {"best_val_accuracy": best["val_accuracy"] or 0.0,
                                             "trials": best["trials"]})
            self.tracker.finish(child)
            self.store.put_json("search", key, "best.json", best)
            self.store.mark_done("search", key, {"best_val_accuracy": best["val_accuracy"]})
            self.ran[f"search/{category}"] = True
        else:
            self._record("search", key, f"search/{category}")
        best = self.store.get_json("search", key, "best.json")
        spec, settings = trial_settings(best["config"], self.cfg.phase3, tune_cfg.max_epochs)
        settings = TrainSettings(**{**settings.__dict__, "patience": self.cfg.phase3.patience})
        return AggregatorSpec(**spec.__dict__), settings

    def _experiment_name(self) -> str:
        return self.tracker.client.get_experiment(self.tracker.experiment_id).name

    def _finish(self, evaluation: str) -> dict:
        report = self.store.get_json("evaluate", evaluation, "report.json")
        t, run = self.tracker, self.tracker.run_id
        t.log_metrics(run, {k.replace("/", "."): v for k, v in report["metrics"].items()})
        t.log_figure(run, plot_confusion(report["confusion"], report["categories"]), "router_confusion.png")
        t.log_figure(run, plot_accuracy(report["dmoerm"], report["baseline"]), "accuracy_by_category.png")
        t.client.log_text(run, report["table"], "evaluation/table.txt")
        version, decision = register_and_promote(self.cfg, self.store, evaluation, t)
        self.ran["register"] = not decision.get("skipped", False)
        return {"evaluation": evaluation, "table": report["table"], "version": version, "decision": decision,
                "ran": self.ran, "experts": self.expert_info}


def register_and_promote(cfg: PipelineConfig, store: StageStore, evaluation: str, tracker: Tracker) -> tuple:
    """Log the bundle as a pyfunc model, register it with its metrics and per-pair outcomes, and move the
    alias only if it beats the champion (first model: the single-RM baseline) on the same pairs."""
    import mlflow

    from dmoerm import registry
    from dmoerm.mlflow_model import log_bundle_model
    from dmoerm.promotion import PairOutcome

    name = cfg.platform.registered_model or cfg.name
    client, run = tracker.client, tracker.run_id
    for mv in _versions(client, name):  # idempotent: this evaluation was registered by an earlier run
        if mv.tags.get("dmoerm.evaluation_key") == evaluation and "dmoerm.promotion.decision" in mv.tags:
            logger.info("%-28s skipped: %s version %s holds this evaluation", "register", name, mv.version)
            return mv.version, {"promote": mv.tags["dmoerm.promotion.decision"] == "promoted",
                                "reason": mv.tags.get("dmoerm.promotion.reason", ""), "skipped": True}
    report = store.get_json("evaluate", evaluation, "report.json")
    outcomes = {k: PairOutcome(*v) for k, v in store.get_json("evaluate", evaluation, "pair_outcomes.json").items()}
    bundle = store.path("evaluate", evaluation, "bundle")
    mlflow.set_tracking_uri(tracker.tracking_uri)
    with mlflow.start_run(run_id=run):
        info = log_bundle_model(bundle)
    mv = registry.register_version(client, name, info.model_uri, run, model_id=info.model_id,
                                   metrics={k: v for k, v in report["metrics"].items() if v == v},
                                   tags={"dmoerm.evaluation_key": evaluation}, pair_outcomes=outcomes)
    baseline = None
    if registry.get_alias(client, name, cfg.platform.alias) is None:
        raw = store.get_json("evaluate", evaluation, "baseline_pair_outcomes.json")
        baseline = {k: PairOutcome(*v) for k, v in raw.items()}
    decision = registry.decide_against_champion(client, name, mv.version, cfg.platform.promotion,
                                                alias=cfg.platform.alias, baseline=baseline)
    registry.promote(client, name, mv.version, decision, alias=cfg.platform.alias)
    return mv.version, {"promote": decision.promote, "reason": decision.reason}


def _versions(client, name: str) -> list:
    from mlflow.exceptions import MlflowException

    try:
        return list(client.search_model_versions(f"name='{name}'"))
    except MlflowException:
        return []


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"), help="Ray cluster (default: local)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray instance")
    p.add_argument("--fail-expert", default=None, help=argparse.SUPPRESS)  # tests: "category/capability:step"
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        cfg = load_config(args.config, args.overrides)
    except ValueError as e:
        print(f"run_pipeline: error: {e}", file=sys.stderr)
        return 2
    if not cfg.platform.storage_uri.startswith("s3://"):
        cfg.platform.storage_uri = os.path.abspath(cfg.platform.storage_uri)
    if cfg.platform.s3_endpoint_url:
        os.environ["AWS_ENDPOINT_URL"] = cfg.platform.s3_endpoint_url
    env = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                      "AWS_DEFAULT_REGION", "HF_HUB_OFFLINE", "MLFLOW_S3_ENDPOINT_URL")
           if k in os.environ}
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:  # a submitted job: its runtime env is set already
        ray.init(address=args.address or "auto")
    elif args.address:
        ray.init(address=args.address, runtime_env={"env_vars": env} if env else None)
    else:
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, runtime_env={"env_vars": env},
                 logging_level=logging.WARNING)
    uri = cfg.platform.mlflow_tracking_uri or default_tracking_uri(cfg.platform.storage_uri)
    artifacts = None
    if uri.startswith("sqlite:"):
        artifacts = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    tracker = Tracker(uri, cfg.platform.experiment, artifacts, run_name=f"{cfg.name}-{uuid.uuid4().hex[:6]}")
    tracker.log_params(tracker.run_id, cfg)
    t0 = time.time()
    try:
        result = Pipeline(cfg, tracker, args.fail_expert).run()
    except BaseException:
        tracker.finish(tracker.run_id, "FAILED")
        raise
    tracker.log_metrics(tracker.run_id, {"pipeline_seconds": time.time() - t0})
    tracker.finish(tracker.run_id)
    name = cfg.platform.registered_model or cfg.name
    print("\n" + result["table"])
    print(f"\nregistered {name} version {result['version']}: "
          f"{'promoted to @' + cfg.platform.alias if result['decision']['promote'] else 'not promoted'}"
          f" - {result['decision']['reason']}")
    print(f"MLflow run: {tracker.run_id} (experiment {cfg.platform.experiment}, tracking {uri})")
    if uri.startswith("sqlite:"):
        print(f"look at it: mlflow ui --backend-store-uri {uri}")
    print("RESULT " + json.dumps({"run_id": tracker.run_id, "version": result["version"],
                                  "promoted": result["decision"]["promote"], "ran": result["ran"],
                                  "experts": result["experts"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
