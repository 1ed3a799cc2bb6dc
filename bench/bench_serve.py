"""The reward endpoint under load vs in-process batched scoring, on the same MiniLM bundle and real rows.

The bundle: MiniLM (top_layers=1, max_length 128), 2 categories x K=5 perturbed LoRA experts, the router as
configs/demo.yaml configures it. Served from the shipped serve/config.yaml (one AdapterPool replica, torch
at ``--threads``), it is hit by ``--concurrency`` clients posting single-response ``/v1/reward`` requests
(real hh-rlhf rows) over HTTP from this process, as an RL trainer's reward calls arrive. Figures:

- ``endpoint_rows_per_s`` (best over the concurrency levels), ``p50_ms`` / ``p99_ms`` latency at that level;
- ``inprocess_rows_per_s``: ``RewardModel.score`` on the same rows in one call, batch 32, same threads;
- ``endpoint_vs_inprocess``: their ratio, target >= 0.7, measured back to back in each repetition (median
  over ``--repeats``); the load generator, proxy, ingress and router share the same 2 cores with the pool,
  as they would on one node, so the ratio charges the endpoint for all of them;
- ``max_batch_rows`` / ``mean_batch_rows``: what ``@serve.batch`` coalesced in the pool;
- ``endpoint_cpu_ms_per_row`` (every Serve process and the load generator) vs ``inprocess_cpu_ms_per_row``,
  and their ratio ``cpu_efficiency_vs_inprocess``: the same comparison in CPU time, which the neighbours'
  load on a shared machine disturbs far less than wall time;
- ``cost_ratio_k5_with_router``: K=5 experts + router vs a single RM on the same rows (bench_scorer's
  definition, CPU time on one thread), target <= 2.0.

    python bench/bench_serve.py [--requests 256] [--concurrency 16 64] [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import REPO, build_category, interleaved, load_rows, median_ratio, setup

from dmoerm.bundle import load_bundle, save_bundle
from dmoerm.config import load_config
from dmoerm.modeling.aggregator import AggregatorConfig
from dmoerm.modeling.backbone import load_backbone
from dmoerm.modeling.reward_model import RewardModel, SingleRewardModel
from dmoerm.modeling.router import RouterHead, RouterInput
from dmoerm.modeling.top import LoraConfig, TopStack

sys.path.insert(0, str(REPO))
NUM_EXPERTS, MAX_LENGTH = 5, 128


def build_bundle(folder: Path) -> str:
    router_spec = load_config(REPO / "configs" / "demo.yaml").router
    backbone = load_backbone("minilm", top_layers=1, max_length=MAX_LENGTH)
    cats = {n: build_category(backbone, n, NUM_EXPERTS, seed=i) for i, n in enumerate(["helpful", "red_team"])}
    torch.manual_seed(0)
    inputs = RouterInput(router_spec.layers, router_spec.max_context_tokens, router_spec.source)
    router = RouterHead(backbone.hidden_size, list(cats), width=router_spec.width, inputs=inputs).eval()
    model = RewardModel(backbone, router, cats, batch_size=32)
    return save_bundle(folder / "bundle", model, lora=LoraConfig(), aggregator=AggregatorConfig(),
                       router_width=router_spec.width, baseline=TopStack(backbone))


async def load(url: str, rows: list[tuple[list[dict], str]], concurrency: int) -> tuple[float, list[float], int]:
    """Post every row once with ``concurrency`` clients; (wall seconds, latencies in ms, failures)."""
    import httpx

    queue = list(enumerate(rows))
    latencies: list[float] = []
    failures = 0

    async def client(http) -> None:
        nonlocal failures
        while queue:
            _, (messages, response) = queue.pop()
            t = time.perf_counter()
            r = await http.post("/v1/reward", json={"messages": messages, "response": response})
            latencies.append((time.perf_counter() - t) * 1000)
            failures += r.status_code != 200

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        return time.perf_counter() - t0, latencies, failures


def serve_cpu_s() -> float:
    """CPU seconds used so far by this process and every Ray Serve process (proxy, replicas, controller)."""
    import psutil

    total = sum(psutil.Process().cpu_times()[:2])
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if any(k in cmd for k in ("ServeReplica", "ProxyActor", "ServeController")):
                total += sum(p.cpu_times()[:2])
        except psutil.Error:
            pass
    return total


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def bench_endpoint(bundle: str, contexts, responses, concurrency: list[int], threads: int, repeats: int,
                   extra_args: dict | None = None, pool_replicas: int = 1, pool_threads: int | None = None) -> dict:
    """Each repetition runs in-process scoring and then the endpoint at every concurrency on the same rows, so
    each endpoint/in-process ratio is measured back to back; the figures are medians over repetitions."""
    import ray
    from ray import serve

    from serve.deploy import deploy, load_serve_config

    rows = [([{"role": t.role, "content": t.content} for t in c], r) for c, r in zip(contexts, responses)]
    torch.set_num_threads(threads)
    model = load_bundle(bundle).model
    ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}})
    port = 8000 + os.getpid() % 1000
    fixed = {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}}
    pools = {"autoscaling_config": {"min_replicas": pool_replicas, "max_replicas": pool_replicas},
             "ray_actor_options": {"num_cpus": 1 / pool_replicas}}  # fits a 2-CPU node beside router and ingress
    pool_threads = pool_threads or max(1, threads // pool_replicas)  # default: the same cores, split
    cfg = load_serve_config(args={"model": bundle, "torch_threads": pool_threads, "reload_interval_s": 0,
                                  **(extra_args or {})},
                            deployments={"AdapterPool": pools, "Router": fixed, "Ingress": fixed}, http={"port": port})
    pool = None
    try:
        deploy(cfg)
        url = f"http://127.0.0.1:{port}"
        asyncio.run(load(url, rows[:32], 8))  # warm-up
        model.score(contexts[:32], responses[:32])
        pool = serve.get_deployment_handle("AdapterPool", app_name="dmoerm")
        runs: dict[int, list[dict]] = {c: [] for c in concurrency}
        inproc: list[float] = []
        inproc_cpu: list[float] = []
        for _ in range(repeats):
            t, c0 = time.perf_counter(), time.process_time()
            model.score(contexts, responses)
            inproc.append(len(responses) / (time.perf_counter() - t))
            inproc_cpu.append((time.process_time() - c0) * 1000 / len(responses))
            for c in concurrency:
                before, cpu0 = pool.batch_stats.remote().result(), serve_cpu_s()
                wall, lat, failed = asyncio.run(load(url, rows, c))
                cpu = (serve_cpu_s() - cpu0) * 1000 / len(rows)
                after = pool.batch_stats.remote().result()
                batches = after["batches"] - before["batches"]
                fig = {"concurrency": c, "endpoint_rows_per_s": len(rows) / wall, "p50_ms": pct(lat, 0.5),
                       "p99_ms": pct(lat, 0.99), "failed": failed, "max_batch_rows": after["max_rows"],
                       "mean_batch_rows": (after["rows"] - before["rows"]) / max(batches, 1),
                       "endpoint_vs_inprocess": len(rows) / wall / inproc[-1], "endpoint_cpu_ms_per_row": cpu,
                       "cpu_efficiency_vs_inprocess": inproc_cpu[-1] / cpu}
                print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in fig.items()}), flush=True)
                runs[c].append(fig)
        med = {c: {k: statistics.median(f[k] for f in figs) for k in figs[0]} for c, figs in runs.items()}
        best = max(med.values(), key=lambda f: f["endpoint_rows_per_s"])
        best["concurrency"] = int(best["concurrency"])
        return best | {"inprocess_rows_per_s": statistics.median(inproc),
                       "inprocess_cpu_ms_per_row": statistics.median(inproc_cpu),
                       "failed_total": sum(f["failed"] for figs in runs.values() for f in figs)}
    finally:
        del pool
        serve.shutdown()
        ray.shutdown()


def bench_cost(bundle: str, contexts, responses, repeats: int) -> float:
    """K=5 + router / single RM, one torch thread, CPU time (bench_scorer's cost_ratio_k5_with_router)."""
    torch.set_num_threads(1)
    loaded = load_bundle(bundle)
    model, single = loaded.model, SingleRewardModel(loaded.model.backbone, TopStack(loaded.model.backbone))
    forced = [next(iter(model.categories))] * len(responses)  # K=5 experts of one category, route timed apart
    cpu, _ = interleaved({"k5": lambda: model.score(contexts, responses, forced),
                          "router": lambda: model.route(contexts),
                          "single": lambda: single.score(contexts, responses)}, repeats)
    return median_ratio([a + b for a, b in zip(cpu["k5"], cpu["router"])], cpu["single"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--route-in-pool", action="store_true", help="route inside the pool's batches (no Router hop)")
    p.add_argument("--pool-replicas", type=int, default=1, help="AdapterPool replicas sharing --threads")
    p.add_argument("--pool-threads", type=int, default=None, help="torch threads per pool replica (default: "
                                                                   "--threads split over the replicas)")
    p.add_argument("--batch-wait-ms", type=float, default=None, help="the pool's batch_wait_timeout_s, in ms")
    args = p.parse_args()
    setup(args.threads)
    contexts, responses = load_rows(args.requests)
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        bundle = build_bundle(Path(tmp))
        cost = bench_cost(bundle, contexts[:32], responses[:32], args.repeats)
        extra = {"route_in_pool": args.route_in_pool}
        if args.batch_wait_ms is not None:
            extra["batch_wait_timeout_s"] = args.batch_wait_ms / 1000
        endpoint = bench_endpoint(bundle, contexts, responses, args.concurrency, args.threads, args.repeats, extra,
                                  args.pool_replicas, args.pool_threads)
    figures = {**endpoint, "cost_ratio_k5_with_router": cost, "requests": args.requests, "threads": args.threads,
               "route_in_pool": args.route_in_pool, "pool_replicas": args.pool_replicas,
               "pool_threads": args.pool_threads or max(1, args.threads // args.pool_replicas),
               "batch_wait_ms": args.batch_wait_ms}
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()}))


if __name__ == "__main__":
    main()
