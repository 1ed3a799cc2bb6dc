"""Phase 3 epoch: aggregator training on cached expert features vs recomputing the frozen experts per step.

The released research code ran the trunk and every (frozen) expert for every batch of every phase-3 step.
Here one epoch of ``fit_pairwise`` on the same aggregator init, rows and batches is timed three ways:
  recompute          tokens -> trunk -> all K experts (one mixed-adapter forward) -> aggregator, per step;
  recompute_experts  cached trunk states -> all K experts -> aggregator, per step (trunk cache only);
  cached             aggregator on ``expert_features`` computed once (our phase 3).
The one-off ``expert_features`` pass (and the trunk cache that phases 1-3 share) is timed separately and not
counted in the epoch. Target: speedup (recompute / cached) >= 20x. The epochs alternate within each
repetition; times are process CPU seconds with one torch thread (steady on a shared machine), medians kept.
The final aggregators of the recompute and cached epochs are checked to agree.
The last line printed is one JSON object of figures.

    python bench/bench_phase3.py [--samples-per-file 48] [--experts 5] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Sequence

import torch
from _common import build_category, interleaved, load_samples, median_ratio, setup

from dmoerm.data.records import Turn
from dmoerm.modeling.aggregator import Aggregator
from dmoerm.modeling.backbone import load_backbone
from dmoerm.modeling.top import run_experts
from dmoerm.training.features import TrunkCache
from dmoerm.training.loop import FitHooks, TrainConfig, fit_pairwise
from dmoerm.training.phases import expert_features, human_groups

BATCH_SIZE = 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples-per-file", type=int, default=48, help="hh-rlhf samples from each demo file")
    parser.add_argument("--experts", type=int, default=5, help="frozen capability experts K")
    parser.add_argument("--max-length", type=int, default=128, help="token budget per row")
    parser.add_argument("--repeats", type=int, default=3, help="alternating timed epochs per variant (median kept)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    args = parser.parse_args()
    setup(args.threads)

    backbone = load_backbone("minilm", top_layers=1, max_length=args.max_length)
    samples = load_samples(args.samples_per_file)
    cat = build_category(backbone, "chat", args.experts, seed=0)
    experts, caps = cat.experts, cat.capabilities

    cache = TrunkCache(backbone, batch_size=BATCH_SIZE)
    start = time.process_time()
    cache.add_samples(samples, progress=False)
    trunk_cache_s = time.process_time() - start
    texts: dict[int, tuple[list[Turn], str]] = {cache.row(s.context, r): (s.context, r)
                                                for s in samples for r in s.responses}
    rows = list(range(len(cache)))
    start = time.process_time()
    features = expert_features(experts, caps, backbone, cache, rows, batch_size=BATCH_SIZE, progress=False)
    feature_cache_s = time.process_time() - start  # (N, K, H), row i = cache row i

    groups = human_groups(samples, cache)
    lengths = cache.lengths()  # the same length-bucketed batches for every variant
    settings = TrainConfig(lr=1e-3, epochs=1, batch_size=BATCH_SIZE, patience=1)
    torch.manual_seed(0)
    init = Aggregator(len(caps), backbone.hidden_size)
    trained: dict[str, Aggregator] = {}
    steps: dict[str, int] = {}

    def recompute(ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = backbone.encode([texts[r][0] for r in ids], [texts[r][1] for r in ids])
        return backbone.trunk(enc), enc.attention_mask  # (N, T, H), (N, T)

    feature_fns = {
        "recompute": lambda ids: run_experts(experts, caps, backbone, *recompute(ids)).pooled,  # (N, K, H)
        "recompute_experts": lambda ids: run_experts(experts, caps, backbone, *cache.collate(ids)).pooled,
        "cached": lambda ids: features[list(ids)],
    }

    def epoch(name: str) -> None:
        agg = copy.deepcopy(init)
        result = fit_pairwise(agg, list(agg.parameters()), lambda ids: agg(feature_fns[name](ids)), groups, [], lengths,
                              settings, seed=0, desc=f"phase3/{name}", hooks=FitHooks(progress=False))
        trained[name], steps[name] = agg, result.steps

    cpu, wall = interleaved({n: (lambda n=n: epoch(n)) for n in feature_fns}, args.repeats)
    with torch.no_grad():
        diff = max(float((trained[n](features) - trained["cached"](features)).abs().max()) for n in trained)
    if diff > 1e-3:
        raise RuntimeError(f"recomputed and cached epochs trained different aggregators (max reward diff {diff:.2e})")
    med = {n: statistics.median(t) for n, t in cpu.items()}
    figures = {
        "epoch_recompute_s": round(med["recompute"], 3),
        "epoch_recompute_experts_s": round(med["recompute_experts"], 3),
        "epoch_cached_s": round(med["cached"], 4),
        "speedup": round(median_ratio(cpu["recompute"], cpu["cached"]), 1),
        "speedup_vs_recompute_experts": round(median_ratio(cpu["recompute_experts"], cpu["cached"]), 1),
        "speedup_wall": round(median_ratio(wall["recompute"], wall["cached"]), 1),
        "feature_cache_once_s": round(feature_cache_s, 3),
        "trunk_cache_once_s": round(trunk_cache_s, 3),
        "rows": len(rows), "steps_per_epoch": steps["cached"], "experts": len(caps),
        "max_reward_diff_recompute_vs_cached": float(f"{diff:.1e}"),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
