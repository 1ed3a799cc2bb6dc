"""What a pipeline run cost in GPU-hours, from the job's own measurements in MLflow:

    python -m cluster.cost RUN_ID [--tracking-uri URI] [--cluster-gpus 16] [--usd-per-gpu-hour 1.2] [--json]

RUN_ID is the parent run the job prints (``MLflow run: ...``). For each of its child runs (a stage, an
expert, a search) the GPU-hours are its wall seconds times the GPUs it reserved:

- seconds: the run's ``seconds`` metric (every expert run has it: its share of its worker group's wall time,
  start-up included); a search run's own start-to-end time (it is open while Tune runs); other stage runs
  are recorded after the stage ended, so their time is not measured: they are listed as such, and count
  only if they reserved GPUs (then the total is a lower bound and says so).
- GPUs: the run's ``gpus`` metric when logged; else an expert's ``workers`` times one GPU each when
  ``platform.expert_resources.use_gpu`` (from the parent run's params); a stage task's ``num_gpus`` as
  jobs/run_pipeline.py asks for it; Tune trials reserve CPUs only (tuning/search_hparams.py).

``--cluster-gpus N``: also what holding N GPUs for the whole run (``pipeline_seconds``) cost, the price of a
cluster that does not scale down. ``--usd-per-gpu-hour``: both in money.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field

USE_GPU = "platform.expert_resources.use_gpu"


@dataclass
class StageCost:
    name: str
    seconds: float | None
    """Wall seconds; None: not measured."""
    gpus: float
    how: str
    """Where ``seconds`` and ``gpus`` came from."""

    @property
    def gpu_hours(self) -> float:
        return (self.seconds or 0.0) * self.gpus / 3600.0


@dataclass
class RunCost:
    run_id: str
    pipeline_seconds: float | None
    stages: list[StageCost] = field(default_factory=list)

    @property
    def gpu_hours(self) -> float:
        return sum(s.gpu_hours for s in self.stages)

    @property
    def unmeasured_gpu_stages(self) -> list[str]:
        return [s.name for s in self.stages if s.seconds is None and s.gpus > 0]

    def to_dict(self) -> dict:
        return {"run_id": self.run_id, "pipeline_seconds": self.pipeline_seconds, "gpu_hours": self.gpu_hours,
                "lower_bound": bool(self.unmeasured_gpu_stages),
                "stages": [asdict(s) | {"gpu_hours": s.gpu_hours} for s in self.stages]}


def stage_task_gpus() -> float:
    """The GPUs one stage task of the Ray job reserves (``jobs.run_pipeline._run_step``'s options)."""
    from jobs.run_pipeline import _run_step

    return float(_run_step._default_options.get("num_gpus", 0) or 0)


def run_cost(client, run_id: str) -> RunCost:
    """``run_id``'s cost from its child runs (``client``: an ``MlflowClient``)."""
    parent = client.get_run(run_id)
    params = parent.data.params
    if USE_GPU not in params:
        raise ValueError(f"run {run_id} has no {USE_GPU} param: not a pipeline run of jobs.run_pipeline "
                         f"(give the parent run id the job printed)")
    use_gpu = params[USE_GPU].lower() == "true"
    task_gpus = None
    out = RunCost(run_id, parent.data.metrics.get("pipeline_seconds"))
    children, token = [], None
    while True:
        page = client.search_runs([parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}'",
                                  max_results=1000, page_token=token)
        children += list(page)
        token = page.token
        if not token:
            break
    for run in sorted(children, key=lambda r: r.info.start_time or 0):
        name, p, m = run.info.run_name, run.data.params, run.data.metrics
        stage = p.get("stage", name.split("/")[0])
        if "seconds" in m:
            seconds, how = m["seconds"], "seconds metric"
        elif stage == "search" and run.info.end_time:
            seconds, how = (run.info.end_time - run.info.start_time) / 1000.0, "search run's wall time"
        else:
            seconds, how = None, "time not measured"
        if "gpus" in m or "gpus" in p:
            gpus, src = float(m.get("gpus", p.get("gpus"))), "gpus logged"
        elif stage == "experts":
            w = str(p.get("workers", ""))
            workers = int(w) if w.isdigit() else 1  # "None": an expert finished by an earlier run
            gpus, src = (float(workers) if use_gpu else 0.0), f"{workers} worker(s), use_gpu={use_gpu}"
        elif stage == "search":
            gpus, src = 0.0, "Tune trials: CPUs only"
        else:
            task_gpus = stage_task_gpus() if task_gpus is None else task_gpus
            gpus, src = task_gpus, "stage task"
        out.stages.append(StageCost(name, seconds, gpus, f"{how}; {src}"))
    return out


def format_cost(cost: RunCost, cluster_gpus: int | None = None, usd: float | None = None) -> str:
    def money(hours: float) -> str:
        return f" (${hours * usd:,.2f})" if usd is not None else ""

    lines = [f"{'stage':<36} {'seconds':>9} {'GPUs':>5} {'GPU-hours':>10}"]
    for s in cost.stages:
        secs = f"{s.seconds:9.1f}" if s.seconds is not None else f"{'-':>9}"
        lines.append(f"{s.name:<36} {secs} {s.gpus:5g} {s.gpu_hours:10.3f}")
    bound = " at least (stages without a measured time reserved GPUs: " + ", ".join(cost.unmeasured_gpu_stages) \
        + ")" if cost.unmeasured_gpu_stages else ""
    lines.append(f"GPU-hours reserved by the run's stages: {cost.gpu_hours:.3f}{money(cost.gpu_hours)}{bound}")
    if cost.pipeline_seconds is not None:
        lines.append(f"pipeline wall time: {cost.pipeline_seconds / 3600:.3f} h")
        if cluster_gpus:
            held = cost.pipeline_seconds * cluster_gpus / 3600
            lines.append(f"holding {cluster_gpus} GPUs for the whole run: {held:.3f} GPU-hours{money(held)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import os

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_id", help="the pipeline's parent MLflow run (the job prints it)")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"))
    p.add_argument("--cluster-gpus", type=int, default=None, help="GPUs held for the whole run (fixed cluster)")
    p.add_argument("--usd-per-gpu-hour", type=float, default=None)
    p.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    args = p.parse_args(argv)
    if not args.tracking_uri:
        print("cluster.cost: give --tracking-uri or set MLFLOW_TRACKING_URI", file=sys.stderr)
        return 2
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        cost = run_cost(MlflowClient(args.tracking_uri), args.run_id)
    except (ValueError, MlflowException) as e:
        print(f"cluster.cost: {e}", file=sys.stderr)
        return 2
    print(json.dumps(cost.to_dict()) if args.json else format_cost(cost, args.cluster_gpus, args.usd_per_gpu_hour))
    return 0


if __name__ == "__main__":
    sys.exit(main())
