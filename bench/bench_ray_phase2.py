"""Phase 2 on Ray: K experts in worker groups (the pipeline's policy) and one TorchTrainer each, vs in one process.

The pipeline's upstream stages (data -> route -> labels -> trunk -> phase 1 per category) run once, keyed and
kept under the scratch storage, on real hh-rlhf rows (two categories, two capabilities each: K = 4) and the
MiniLM trunk. Then the same K experts (same config, inputs and stage keys) are trained
  sequential       ``train_expert_step`` for each expert in turn, in this process, torch at its default threads
                   (the cores of the machine; no Ray);
  ray_grouped      ``ray.init(num_cpus=N)`` (``--num-cpus``, 2) and the pipeline's phase 2 (``plan_expert_groups`` +
                   ``launch_expert_groups`` + ``each_expert``) under ``platform.expert_resources.group`` (``--group``,
                   auto: these small experts are packed into N plain-task groups of 1 CPU, each paying one process
                   start-up and backbone load, its experts one after another); run first, on cold workers;
  ray_concurrent   the same Ray instance, ``group=expert``: every expert its own TorchTrainer (1 worker x 1 CPU), all
                   submitted at once (the pipeline before worker groups): N experts train at a time.
Diagnostics, to tell why the speedup is what it is: the first expert in-process, cut short, at 1 torch thread
vs the default, alternating (thread scaling: the Ray workers use 1 thread each), and one expert's TorchTrainer
alone, split into start-up, backbone load, training and teardown (``_timed_loop`` mirrors
``jobs.train_experts._train_loop``, checkpoints included).
Sizing: MiniLM at max_length 64, top_layers 1; each expert's labels are ~275 prompts of its category's own hh
file (not held out for phase 3 / val / test), 4 epochs (~145 steps of 16 responses): ~12-15 s on one core,
so the ~15 s fixed cost of a Ray Train fit is realistic but not the whole story, and the bench stays within
~5 min on 2 shared cores. Times are wall seconds (Ray spreads work over processes, so process CPU time cannot
compare the two); the load average is reported beside them. Upstream stages are kept between runs (keyed).
The last line printed is one JSON object of figures.

    python bench/bench_ray_phase2.py [--samples-per-file 240] [--label-samples 300] [--epochs 4] [--fresh]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRATCH = Path("/tmp/bench-ray")
for _k, _v in (("HF_HUB_OFFLINE", "1"), ("RAY_AUTH_MODE", "disabled"), ("MLFLOW_DISABLE_TELEMETRY", "true"),
               ("RAY_TMPDIR", "/tmp/rb"), ("RAY_DEDUP_LOGS", "0")):
    os.environ.setdefault(_k, _v)
Path(os.environ["RAY_TMPDIR"]).mkdir(parents=True, exist_ok=True)
sys.path.insert(0, str(REPO))  # jobs/ and tuning/ (the Ray workers get it through PYTHONPATH)

import torch  # noqa: E402
from _common import interleaved, median_ratio  # noqa: E402

from dmoerm.config import PipelineConfig, load_config  # noqa: E402
from dmoerm.stages.base import backbone_for  # noqa: E402
from dmoerm.stages.data import data_step  # noqa: E402
from dmoerm.stages.expert_groups import expert_slots, plan_expert_groups  # noqa: E402
from dmoerm.stages.labels import capability_samples, label_step  # noqa: E402
from dmoerm.stages.route import route_step  # noqa: E402
from dmoerm.stages.store import StageStore  # noqa: E402
from dmoerm.stages.train import ExpertInputs, expert_key, top_step, train_expert_step, trunk_step  # noqa: E402
from dmoerm.training.loop import FitHooks, FitResult  # noqa: E402

DATA = REPO / "data" / "hh-rlhf-demo"
CATEGORIES = {"helpful": DATA / "helpful.jsonl.gz", "red_team": DATA / "harmless-base.jsonl.gz"}


def build_config(storage: Path, *, samples_per_file: int, label_samples: int, epochs: int, max_length: int = 64,
                 capabilities: int = 2, tune: dict | None = None) -> PipelineConfig:
    """Like tests/jobs/pipeline_fixtures.py's config, on MiniLM and real hh-rlhf rows: every category gets
    ``capabilities`` experts labelled from its own file (the rows' ranks; identical work per expert)."""
    caps = {c: [f"{c}_cap{i}" for i in range(capabilities)] for c in CATEGORIES}
    raw = {
        "name": "bench-phase2", "seed": 0,
        "taxonomy": [{"name": c, "capabilities": caps[c]} for c in CATEGORIES],
        "data": {"sources": [{"path": str(p), "format": "hh", "category": c, "limit": samples_per_file}
                             for c, p in CATEGORIES.items()],
                 "splits": {"phase1": 0.4, "phase3": 0.3, "val": 0.1, "test": 0.2}},
        "labels": {"source": "dataset", "max_samples_per_capability": label_samples,
                   "datasets": {cap: [{"path": str(p), "format": "hh", "category": c,
                                       "limit": samples_per_file + label_samples}]
                                for c, p in CATEGORIES.items() for cap in caps[c]}},
        "model": {"base": "minilm", "top_layers": 1, "max_length": max_length, "feature_batch_size": 32,
                  "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
        "router": {"train": {"lr": 0.01, "epochs": 10, "batch_size": 32, "patience": 3}},
        "phase1": {"lr": 1e-4, "epochs": 1, "batch_size": 16, "patience": 1},
        # patience = epochs: no early stop, so every run does the same steps
        "phase2": {"lr": 5e-4, "epochs": epochs, "batch_size": 16, "patience": epochs},
        "phase3": {"lr": 1e-3, "epochs": 5, "batch_size": 32, "patience": 5},
        "baseline": False,
        "platform": {"storage_uri": str(storage), "experiment": "bench",
                     "expert_resources": {"num_workers": 1, "cpus_per_worker": 1, "max_failures": 0},
                     **({"tune": tune} if tune else {})},
    }
    return load_config(data=raw)


def run_upstream(cfg: PipelineConfig, store: StageStore) -> tuple[list[ExpertInputs], dict[str, str]]:
    """data -> route -> labels -> trunk -> phase 1 per category (skipped when already done)."""
    data = data_step(cfg, store)
    route = route_step(cfg, store, data)
    labels = label_step(cfg, store, route)
    trunk = trunk_step(cfg, store, route, labels)
    tops = {c.name: top_step(cfg, store, route, trunk, c.name) for c in cfg.taxonomy}
    inputs = [ExpertInputs(route, labels, trunk, tops[c.name], c.name, cap)
              for c in cfg.taxonomy for cap in c.capabilities]
    return inputs, tops


def train_expert_here(cfg: PipelineConfig, store: StageStore, inputs: ExpertInputs,
                      hooks: FitHooks | None = None) -> FitResult:
    """``train_expert_step`` in this process (it trains, then saves the expert as the pipeline does)."""
    return train_expert_step(cfg, store, inputs, expert_key(cfg, store, inputs), hooks or FitHooks(progress=False))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] load {os.getloadavg()[0]:.1f}: {msg}", file=sys.stderr, flush=True)


def train_in_process(cfg: PipelineConfig, store: StageStore, inputs: ExpertInputs) -> tuple[float, int]:
    start = time.perf_counter()
    result = train_expert_here(cfg, store, inputs)
    return time.perf_counter() - start, result.steps


def _timed_loop(config: dict) -> None:
    """``jobs.train_experts._train_loop`` (1 worker) with a timestamp at each phase, reported at the end."""
    entered = time.time()
    import tempfile

    import ray.train
    from ray.train import Checkpoint

    from dmoerm.checkpoint import save_state

    cfg, inputs = config["cfg"], config["inputs"]
    store = StageStore(config["storage"], run_id="bench-timed")
    torch.set_num_threads(1)
    imported = time.time()
    backbone_for(cfg)  # lru-cached: train_expert_step reuses it
    backbone = time.time()
    checkpoint_s = [0.0]

    def checkpoint(state: dict) -> None:
        start = time.time()
        with tempfile.TemporaryDirectory() as d:
            save_state(d, state)
            ray.train.report({"epoch": state["epoch"]}, checkpoint=Checkpoint.from_directory(d))
        checkpoint_s[0] += time.time() - start

    result = train_expert_here(cfg, store, inputs, FitHooks(checkpoint=checkpoint, progress=False))
    Path(config["out"]).write_text(json.dumps({"entered": entered, "imported": imported, "backbone": backbone,
                                               "trained": time.time(), "checkpoint_s": checkpoint_s[0],
                                               "steps": result.steps}))


def timed_fit(cfg: PipelineConfig, storage: Path, inputs: ExpertInputs) -> dict[str, float]:
    """One expert's TorchTrainer alone (1 worker x 1 CPU, checkpoint every epoch, as the pipeline does), split
    into start-up (fit() to the loop's first line), imports, backbone load, training (with its checkpoint
    reports) and teardown (the loop's end to fit() returning)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out = storage / "timed_fit.json"
    out.unlink(missing_ok=True)
    trainer = TorchTrainer(_timed_loop,
                           train_loop_config={"cfg": cfg, "storage": str(storage), "inputs": inputs, "out": str(out)},
                           scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                           run_config=RunConfig(name=f"timed-fit-{time.time_ns()}",
                                                storage_path=str(storage / "ray_train")))
    start = time.time()
    trainer.fit()
    end = time.time()
    m = json.loads(out.read_text())
    return {"total_s": end - start, "startup_s": m["entered"] - start, "imports_s": m["imported"] - m["entered"],
            "backbone_load_s": m["backbone"] - m["imported"], "train_s": m["trained"] - m["backbone"],
            "checkpoint_reports_s": m["checkpoint_s"], "teardown_s": end - m["trained"], "steps": m["steps"]}


def ray_init(num_cpus: int) -> None:
    import ray

    env = {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           **{k: os.environ[k] for k in ("HF_HUB_OFFLINE", "MLFLOW_DISABLE_TELEMETRY") if k in os.environ}}
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, runtime_env={"env_vars": env},
             logging_level=logging.WARNING, log_to_driver=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples-per-file", type=int, default=240, help="hh-rlhf samples per category (splits)")
    parser.add_argument("--label-samples", type=int, default=300, help="capability-labelled samples per expert")
    parser.add_argument("--epochs", type=int, default=4, help="phase-2 epochs per expert")
    parser.add_argument("--num-cpus", type=int, default=2, help="Ray CPUs (1 worker x 1 CPU per expert or group)")
    parser.add_argument("--group", default="auto", choices=["auto", "category", "expert"],
                        help="platform.expert_resources.group of the grouped run")
    parser.add_argument("--scaling-steps", type=int, default=50, help="steps of each thread-scaling run")
    parser.add_argument("--scaling-repeats", type=int, default=3, help="alternating 1-thread/default runs")
    parser.add_argument("--fresh", action="store_true", help="recompute the upstream stages too")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    root = SCRATCH / "phase2"
    if args.fresh:
        shutil.rmtree(root, ignore_errors=True)
    storage = root / "storage"
    cfg = build_config(storage, samples_per_file=args.samples_per_file, label_samples=args.label_samples,
                       epochs=args.epochs)
    store = StageStore(str(storage), run_id="bench")
    default_threads = torch.get_num_threads()
    load = {"before": [round(x, 2) for x in os.getloadavg()]}

    start = time.perf_counter()
    inputs, _ = run_upstream(cfg, store)
    upstream_s = time.perf_counter() - start
    log(f"upstream stages {upstream_s:.1f} s")
    labelled = {f"{i.category}/{i.capability}": len(capability_samples(store, i.labels, i.category,
                                                                        i.capability, "train"))
                for i in inputs}

    # (a) sequential, in this process, torch at its default thread count
    seq: dict[str, float] = {}
    steps_per_expert: dict[str, int] = {}
    start = time.perf_counter()
    for inp in inputs:
        name = f"{inp.category}/{inp.capability}"
        seq[name], steps_per_expert[name] = train_in_process(cfg, store, inp)
        log(f"in-process {name}: {seq[name]:.1f} s, {steps_per_expert[name]} steps")
    sequential_s = time.perf_counter() - start
    load["after_sequential"] = [round(x, 2) for x in os.getloadavg()]

    # thread scaling: the first expert cut to --scaling-steps steps, 1 thread (as a Ray worker) and the default
    # thread count alternating, medians of the per-repetition ratios (the neighbours' load moves within seconds)
    first = f"{inputs[0].category}/{inputs[0].capability}"
    short = dataclasses.replace(cfg, phase2=dataclasses.replace(cfg.phase2, max_steps=args.scaling_steps))

    def short_run(threads: int) -> None:
        torch.set_num_threads(threads)
        train_expert_here(short, store, inputs[0])
        torch.set_num_threads(default_threads)

    _, scaling = interleaved({"1": lambda: short_run(1), "default": lambda: short_run(default_threads)},
                             args.scaling_repeats)
    thread_speedup = median_ratio(scaling["1"], scaling["default"])
    log(f"thread scaling {scaling}: {thread_speedup:.2f}")

    # (b) through Ray: the pipeline's worker groups, then every expert its own TorchTrainer, all submitted at once
    import ray

    from jobs.train_experts import each_expert, launch_expert_groups

    start = time.perf_counter()
    ray_init(args.num_cpus)
    init_s = time.perf_counter() - start
    keys = [expert_key(cfg, store, i) for i in inputs]
    names = {k: f"{i.category}/{i.capability}" for i, k in zip(inputs, keys)}

    def ray_phase2(group: str) -> tuple[float, dict[str, dict], list]:
        """The pipeline's phase 2 under ``group`` on the fresh Ray instance: wall seconds, infos, groups."""
        for d in (store.local_root / "stages" / "experts", storage / "ray_train"):
            shutil.rmtree(d, ignore_errors=True)  # nothing may be skipped: same keys as (a), never trained here
        run_cfg = dataclasses.replace(cfg, platform=dataclasses.replace(
            cfg.platform, expert_resources=dataclasses.replace(cfg.platform.expert_resources, group=group)))
        ray_store = StageStore(str(storage), run_id=f"bench-ray-{group}")
        start = time.perf_counter()
        groups = plan_expert_groups(run_cfg, ray_store, inputs, keys,
                                    expert_slots(run_cfg.platform.expert_resources, ray.cluster_resources()))
        infos = {names[info["key"]]: info for info in each_expert(launch_expert_groups(run_cfg, ray_store, groups))}
        wall = time.perf_counter() - start
        log(f"Ray {group} {wall:.1f} s in {len(groups)} groups: {[info['seconds'] for info in infos.values()]}")
        if any(info.get("run") != ray_store.run_id for info in infos.values()) or len(infos) != len(inputs):
            raise RuntimeError(f"an expert was skipped in the Ray run: {infos}")
        if any(info["steps"] != steps_per_expert[n] for n, info in infos.items()):
            raise RuntimeError(f"Ray and in-process experts took different steps: {infos} vs {steps_per_expert}")
        return wall, infos, [{"experts": [names[k] for _, k in g.experts], "trainer": g.trainer} for g in groups]

    ray_grouped_s, grouped, group_plan = ray_phase2(args.group)
    load["after_ray_grouped"] = [round(x, 2) for x in os.getloadavg()]
    ray_concurrent_s, infos, _ = ray_phase2("expert")
    load["after_ray"] = [round(x, 2) for x in os.getloadavg()]
    timed = timed_fit(cfg, storage, inputs[0])  # alone: the fixed cost of one fit, split up
    log(f"timed fit {timed}")
    load["after_timed_fit"] = [round(x, 2) for x in os.getloadavg()]
    ray.shutdown()

    ray_fit = {n: float(info["seconds"]) for n, info in infos.items()}
    # Model: an expert trains in T1 s on one thread, T1 / s on the default threads (s = thread_speedup), a fit
    # costs O s on top (start-up + backbone load + teardown), C fits run at once. sequential = K T1 / s,
    # concurrent = ceil(K / C) (T1 + O): speedup = C T1 / (s (T1 + O)) when K is a multiple of C, at most C / s.
    # (The concurrent fits' own seconds are not used for O: the fits beyond the first C include their queueing.)
    t1 = timed["train_s"] - timed["checkpoint_reports_s"]  # includes reading its labels and trunk rows, as in-process
    overhead_s = timed["total_s"] - t1
    rounds = -(-len(inputs) // args.num_cpus)
    figures = {
        "K": len(inputs), "cpu_count": os.cpu_count(), "ray_num_cpus": args.num_cpus,
        "torch_default_threads": default_threads,
        "sequential_s": round(sequential_s, 1),
        "ray_grouped_s": round(ray_grouped_s, 1),
        "speedup_grouped": round(sequential_s / ray_grouped_s, 2),
        "group_policy": args.group, "groups": group_plan,
        "expert_grouped_s": {n: info["seconds"] for n, info in grouped.items()},
        "expert_grouped_train_s": {n: info["train_seconds"] for n, info in grouped.items()},
        "ray_concurrent_s": round(ray_concurrent_s, 1),
        "speedup": round(sequential_s / ray_concurrent_s, 2),
        "per_fit_overhead_s": round(overhead_s, 1),
        "thread_speedup": round(thread_speedup, 2),
        "speedup_ceiling": round(args.num_cpus / thread_speedup, 2),
        "predicted_speedup": round(len(inputs) * t1 / thread_speedup / (rounds * (t1 + overhead_s)), 2),
        "single_fit_breakdown_s": {k: round(v, 1) for k, v in timed.items()},
        "ray_init_s": round(init_s, 1),
        "expert_in_process_s": {n: round(t, 1) for n, t in seq.items()},
        "expert_ray_fit_s": {n: round(t, 1) for n, t in ray_fit.items()},
        "thread_scaling_wall_s": {k: [round(x, 1) for x in v] for k, v in scaling.items()},
        "steps_per_expert": steps_per_expert[first], "labelled_train_samples": labelled,
        "upstream_s": round(upstream_s, 1), "load_avg": load,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
