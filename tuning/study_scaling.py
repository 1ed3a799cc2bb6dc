"""The data-scaling study as a Ray Tune grid (``dmoerm study scaling --config configs/study_scaling.yaml``).

The driver runs the stages every trial shares (data, route, labels and the trunk features) once, then Tune
runs one trial per (fraction, number of categories, seed): ``dmoerm.studies.scaling.run_trial`` in the trial's
process (stages one after the other, experts in process, no search inside). Every stage of every trial is
keyed in the StageStore, so a re-run with the same inputs skips the finished trials' stages and only
re-reads their results. The report (table, CSV, JSON, plots) goes to ``<output_dir>/study-scaling`` and to
one MLflow run; the table is printed, then ``RESULT {json}``.
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

from dmoerm.config import PipelineConfig
from dmoerm.stages.store import StageStore
from dmoerm.studies.scaling import ScalingConfig, SharedKeys, Subset, load_study_config, prepare_shared, run_trial
from jobs.connect_ray import init_ray

logger = logging.getLogger(__name__)


def _trainable(config: dict, *, cfg: PipelineConfig, store: StageStore, shared: SharedKeys,
               study: ScalingConfig) -> None:
    import torch
    from ray import tune

    torch.set_num_threads(max(1, int(study.cpus_per_trial)))
    subset = Subset(float(config["fraction"]), int(config["num_categories"]), int(config["seed"]))
    result = run_trial(cfg, store, shared, subset, study)
    overall = result["metrics"]["overall"]
    tune.report({"dmoerm_accuracy": overall["dmoerm"]["accuracy"], "single_accuracy": overall["single"]["accuracy"],
                 "stages_ran": len(result["stages_ran"]), "result_json": json.dumps(result, default=str)})


def run_grid(cfg: PipelineConfig, store: StageStore, shared: SharedKeys, study: ScalingConfig) -> list[dict]:
    """Every trial of the grid through Ray Tune (a Ray instance must be up); their results, in grid order."""
    from ray import tune

    trainable = tune.with_parameters(_trainable, cfg=cfg, store=store, shared=shared, study=study)
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": study.cpus_per_trial}),
        param_space={"fraction": tune.grid_search(study.fractions),
                     "num_categories": tune.grid_search(study.num_categories),
                     "seed": tune.grid_search(study.seeds)},
        tune_config=tune.TuneConfig(max_concurrent_trials=study.max_concurrent),
        run_config=tune.RunConfig(name=f"study-scaling-{store.run_id}", verbose=0,
                                  storage_path=os.path.join(store.local_root, "ray_tune")
                                  if not store.remote else f"{store.root}/ray_tune"),
    )
    grid = tuner.fit()
    failed = [r for r in grid if r.error is not None]
    if failed:
        raise RuntimeError(f"{len(failed)} scaling trial(s) failed, first ({failed[0].config}): {failed[0].error}")
    trials = [json.loads(r.metrics["result_json"]) for r in grid]
    return sorted(trials, key=lambda t: (t["subset"]["fraction"], t["subset"]["num_categories"], t["subset"]["seed"]))


def run_study(config: str, overrides: list[str] | None = None, address: str | None = None,
              num_cpus: int | None = None) -> dict:
    """The whole study; what it printed and wrote (table, file paths, MLflow run, trial results)."""
    import ray

    from dmoerm.pipeline import open_store
    from dmoerm.studies.scaling_report import aggregate, format_table, log_report, write_report
    from dmoerm.tracking import tracking_uri_of

    cfg, study = load_study_config(config, overrides)
    store = open_store(cfg, run_id=f"scaling-{uuid.uuid4().hex[:12]}")
    t0 = time.perf_counter()
    shared, shared_ran = prepare_shared(cfg, store)
    started = init_ray(address, num_cpus)
    try:
        trials = run_grid(cfg, store, shared, study)
    finally:
        if started:
            ray.shutdown()
    rows = aggregate(trials, study)
    paths = write_report(rows, trials, study, Path(cfg.output_dir) / "study-scaling")
    params = {"config": config, "overrides": overrides or [], "study": study, "shared": shared,
              "pipeline": {"name": cfg.name, "model": cfg.model, "phase1": cfg.phase1, "phase2": cfg.phase2}}
    run_id = log_report(tracking_uri_of(cfg.platform), cfg.platform.experiment, f"study-scaling-{cfg.name}",
                        paths, rows, params)
    return {"table": format_table(rows, study.confidence), "run_id": run_id, "rows": rows, "trials": trials,
            "paths": {k: str(v) for k, v in paths.items()}, "shared": shared.__dict__, "shared_ran": shared_ran,
            "seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--address", help="a running Ray cluster (default: a fresh local instance)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance")
    p.add_argument("overrides", nargs="*", help="dotted.key=value (study.fractions=[0.5,1.0], phase1.epochs=1)")
    args = p.parse_args(argv)
    out = run_study(args.config, args.overrides, args.address, args.num_cpus)
    print(out["table"])
    print(f"plots: {', '.join(v for k, v in out['paths'].items() if k.endswith('.png'))}")
    print(f"MLflow run {out['run_id']}; trials: {len(out['trials'])}, stages run: "
          f"{sum(len(t['stages_ran']) for t in out['trials'])} (0: every trial was finished earlier); "
          f"{out['seconds']} s")
    print("RESULT " + json.dumps({k: out[k] for k in ("run_id", "paths", "shared", "shared_ran", "seconds")}
                                 | {"trials": [{"subset": t["subset"], "stages_ran": t["stages_ran"]}
                                               for t in out["trials"]]}))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main())
