"""Best-of-N candidates as a Ray job: prompts sharded over Ray actors, each loading the generator once
(``dmoerm.generation``: vLLM on GPU workers when the gpu extra is installed, else transformers).

    python -m jobs.generate_candidates --prompts prompts.jsonl --out candidates.jsonl \\
        model=Qwen/Qwen2.5-0.5B-Instruct num_candidates=16 max_new_tokens=512 [--config generation.yaml] \\
        [--num-workers 4 --gpus-per-worker 1] [--address ray://head:10001]

``--prompts``: JSON lines with ``prompt`` (a string) or ``context`` (turns) and an optional ``id``;
``--out``: JSON lines ``{"id", "prompt" | "context", "candidates": [N texts], "generation": {...}}``
(local or ``s3://``). Overrides and ``--config`` are :class:`dmoerm.generation.GenerationConfig` fields.

The first actor decides the backend (``auto`` is resolved where the GPUs are, not on the head node) and
plans the batches (longest prompts first, ``batch_size`` prompts per ``generate`` call; vLLM: one share of
the prompts per worker, which its engine batches itself); an ``ActorPool`` runs them. Sampling is seeded
per prompt, so the candidates equal an in-process :func:`dmoerm.generation.generate_candidates` run with
the same config, whatever the number of workers. One GPU per worker: a vLLM model that needs tensor
parallelism over several GPUs is out of this job's scope (serve it, see ``serve/judge_llm.py``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence

import ray

from dmoerm.configtools import apply_overrides, from_dict, load_yaml
from dmoerm.generation import (
    GenerationConfig,
    Prompt,
    build_generator,
    encode_prompts,
    plan_batches,
    read_prompts,
    write_candidates,
)
from jobs.connect_ray import init_ray

logger = logging.getLogger(__name__)


@ray.remote
class GeneratorActor:
    """One loaded generator (model weights once per actor)."""

    def __init__(self, cfg: GenerationConfig, num_threads: int) -> None:
        import torch

        torch.set_num_threads(max(1, num_threads))
        self.gen = build_generator(cfg)

    def describe(self) -> tuple[str, int | None]:
        return self.gen.backend, self.gen.prompts_per_call

    def plan(self, prompts: list[Prompt], per_call: int) -> tuple[list[list[int]], list[list[int]]]:
        ids = encode_prompts(prompts, self.gen.tokenizer)
        return ids, plan_batches([len(x) for x in ids], per_call)

    def generate(self, token_ids: list[list[int]]) -> list[list[str]]:
        return self.gen.generate_batch(token_ids)


def generate_candidates_ray(prompts: Sequence[Prompt], cfg: GenerationConfig, *, num_workers: int = 1,
                            gpus_per_worker: float = 0.0, cpus_per_worker: float = 1.0,
                            progress: bool = True) -> list[list[str]]:
    """``cfg.num_candidates`` responses per prompt, in prompt order, from ``num_workers`` Ray actors."""
    from ray.util import ActorPool
    from tqdm.auto import tqdm

    if not prompts:
        return []
    actors = [GeneratorActor.options(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker)
              .remote(cfg, int(cpus_per_worker)) for _ in range(max(1, num_workers))]
    try:
        backend, per_call = ray.get(actors[0].describe.remote())
        per_call = per_call or math.ceil(len(prompts) / len(actors))
        ids, batches = ray.get(actors[0].plan.remote(list(prompts), per_call))
        logger.info("generating %d x %d candidates (%s) in %d batches on %d workers", len(prompts),
                    cfg.num_candidates, backend, len(batches), len(actors))
        results = ActorPool(actors).map(lambda a, b: a.generate.remote([ids[i] for i in b]), batches)
        out: list[list[str] | None] = [None] * len(prompts)
        for batch, texts in tqdm(zip(batches, results), total=len(batches), desc=f"generate ({backend})",
                                 unit="batch", disable=not progress):
            for i, t in zip(batch, texts):
                out[i] = t
    finally:
        for a in actors:
            ray.kill(a)
    missing = [i for i, t in enumerate(out) if t is None]
    if missing:
        raise RuntimeError(f"no candidates came back for prompts {missing[:10]}")
    return out  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", required=True, help="JSON lines of prompts (local or s3://)")
    p.add_argument("--out", required=True, help="JSON lines of candidates to write (local or s3://)")
    p.add_argument("--config", help="YAML of GenerationConfig fields")
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--gpus-per-worker", type=float, default=0.0)
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"), help="Ray cluster (default: local)")
    p.add_argument("overrides", nargs="*", help="GenerationConfig fields as key=value, e.g. num_candidates=16")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = from_dict(GenerationConfig, apply_overrides(load_yaml(args.config) if args.config else {},
                                                          args.overrides), "generation")
        if args.num_workers < 1:
            raise ValueError(f"--num-workers must be >= 1, got {args.num_workers}")
        ids, prompts = read_prompts(args.prompts)
    except ValueError as e:
        print(f"generate_candidates: error: {e}", file=sys.stderr)
        return 2
    init_ray(args.address)
    t0 = time.monotonic()
    candidates = generate_candidates_ray(prompts, cfg, num_workers=args.num_workers,
                                         gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker)
    rows = write_candidates(args.out, ids, prompts, candidates, cfg)
    seconds = time.monotonic() - t0
    print(json.dumps({"prompts": rows, "candidates": rows * cfg.num_candidates, "out": args.out,
                      "seconds": round(seconds, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
