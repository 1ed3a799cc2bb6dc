"""The shared-trunk default vs the paper's whole-model recipe, and the two trunk-cache policies, on a tiny
random Llama-shaped decoder (no download) over real hh-rlhf rows, on CPU.

  (a) phase-2 step: one LoRA expert (r=32, alpha=32, q/v, dropout 0.05) trained on its trunk features,
      seconds per optimiser step, with top_layers=1 (cached trunk) and top_layers=all blocks (the trunk is
      the embeddings, recomputed: what ``trunk_cache: auto`` picks there).
  (b) scoring: ``RewardModel.score`` rows/s with K=5 experts in one category, top_layers=1 vs all.
  (c) one phase-1 epoch at top_layers=1 on the cached trunk (shards, read per batch) vs recomputed (the
      trunk run per batch); the two trained tops are checked to agree.
  (d) memory: the resident-set growth of a fresh process while a full pass reads every row through the
      cached policy (batches of 32, at most 2 open shards), against the cache's size and against loading
      every row into memory (the old cache).

Times are process CPU seconds on one torch thread (steady on a shared machine); (a)-(c) alternate their
variants within each repetition and keep medians. The last line printed is one JSON object of figures.

    python bench/bench_trunk_policy.py [--rows 384] [--layers 6] [--hidden 256] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import build_category, interleaved, load_samples, median_ratio, setup

from dmoerm.modeling.backbone import Backbone, build_backbone, resolve_model_path
from dmoerm.modeling.reward_model import RewardModel
from dmoerm.modeling.router import RouterHead
from dmoerm.modeling.top import LoraConfig, TopStack, attach_experts
from dmoerm.training.features import CachedTrunk, RecomputedTrunk, TrunkShardWriter
from dmoerm.training.loop import FitHooks, TrainConfig
from dmoerm.training.phases import human_groups, train_expert, train_top

PAPER_LORA = LoraConfig(r=32, alpha=32, dropout=0.05, target_modules=["q_proj", "v_proj"])


def decoder(layers: int, hidden: int, max_length: int) -> dict[str, Backbone]:
    """One random Llama-shaped model, split two ways (the same weights): top_layers 1 and all."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel

    tok = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    tok.bos_token, tok.eos_token, tok.pad_token, tok.padding_side = "[CLS]", "[SEP]", None, "left"
    torch.manual_seed(0)
    model = LlamaModel(LlamaConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, intermediate_size=hidden * 8 // 3,
                                   max_position_embeddings=max_length)).eval()
    return {name: build_backbone(model, tok, top_layers=top, pooling="last", max_length=max_length,
                                 reference="bench-decoder") for name, top in (("top1", 1), ("all", layers))}


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_probe(mode: str, folder: str) -> None:
    """In a fresh process: the peak resident-set growth (MB) of one pass over every row of the cache at
    ``folder``, streamed in batches of 32 through ``CachedTrunk`` (``stream``) or loaded whole (``whole``)."""
    cache = CachedTrunk(folder, max_open_shards=2)
    ids = list(range(len(cache)))
    base = peak = rss_mb()
    if mode == "whole":
        held = [cache.tensor(r) for r in ids]  # what the old cache held: every row, in memory
        peak = rss_mb()
        del held
    else:
        for i in range(0, len(ids), 32):
            cache.collate(ids[i:i + 32])
            peak = max(peak, rss_mb())
    cache.close()
    print(json.dumps(round(peak - base, 1)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=384, help="training rows (2 per sample)")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--steps", type=int, default=4, help="phase-2 steps per timing")
    ap.add_argument("--score-rows", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rss-probe", nargs=2, metavar=("MODE", "FOLDER"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_probe:
        return rss_probe(*args.rss_probe)
    setup(threads=1)
    bbs = decoder(args.layers, args.hidden, args.max_length)
    samples = load_samples(args.rows // 4)
    work = Path(tempfile.mkdtemp(prefix="bench-trunk-"))

    t0 = time.process_time()
    writer = TrunkShardWriter(bbs["top1"], work, shard_bytes=4 << 20, batch_size=32)
    writer.add_samples(samples, progress=False)
    written = writer.close()
    build_s = time.process_time() - t0
    features = {"top1": CachedTrunk(work), "all": RecomputedTrunk(bbs["all"]).add_samples(samples)}
    recomputed_top1 = RecomputedTrunk(bbs["top1"]).add_samples(samples)
    groups = human_groups(samples, features["top1"])
    steps = TrainConfig(lr=1e-4, epochs=1, batch_size=32, max_steps=args.steps, warmup_ratio=0.0)

    def phase2(name: str):
        def run() -> None:
            experts = attach_experts(TopStack(bbs[name]), ["logic"], PAPER_LORA)
            train_expert(experts, "logic", bbs[name], features[name], human_groups(samples, features[name]), [],
                         steps, hooks=FitHooks(progress=False))
        return run

    cpu, _ = interleaved({n: phase2(n) for n in bbs}, args.repeats)
    step_s = {n: statistics.median(cpu[n]) / args.steps for n in bbs}

    ctx = [s.context for s in samples for _ in s.responses][: args.score_rows]
    resp = [r for s in samples for r in s.responses][: args.score_rows]
    scorers = {n: RewardModel(bb, RouterHead(bb.hidden_size, ["c"]), {"c": build_category(bb, "c", 5, seed=1)},
                              batch_size=32) for n, bb in bbs.items()}
    cpu_score, _ = interleaved({n: (lambda m=m: m.score(ctx, resp, ["c"] * len(ctx))) for n, m in scorers.items()},
                               args.repeats)

    epoch = TrainConfig(lr=1e-3, epochs=1, batch_size=32, warmup_ratio=0.0)
    tops = {}

    def phase1(name: str, feats):
        def run() -> None:
            tops[name] = train_top(bbs["top1"], feats, samples, [], epoch, hooks=FitHooks(progress=False))[0]
        return run

    cpu_epoch, _ = interleaved({"cached": phase1("cached", features["top1"]),
                                "recompute": phase1("recompute", recomputed_top1)}, args.repeats)
    agree = max(float((a - b).abs().max()) for a, b in zip(tops["cached"].state_dict().values(),
                                                            tops["recompute"].state_dict().values()))

    growth = {mode: json.loads(subprocess.run([sys.executable, __file__, "--rss-probe", mode, str(work)],
                                              capture_output=True, text=True, check=True).stdout.splitlines()[-1])
              for mode in ("stream", "whole")}

    figures = {
        "model": f"llama-shaped random, {args.layers} blocks, H={args.hidden}, max_length {args.max_length}",
        "rows": len(groups) * 2, "mean_tokens": round(statistics.mean(features["top1"].lengths()), 1),
        "phase2_step_s_top1": round(step_s["top1"], 4), "phase2_step_s_all": round(step_s["all"], 4),
        "phase2_step_ratio_all_vs_top1": round(median_ratio(cpu["all"], cpu["top1"]), 2),
        "score_rows_per_s_top1": round(len(ctx) / statistics.median(cpu_score["top1"]), 1),
        "score_rows_per_s_all": round(len(ctx) / statistics.median(cpu_score["all"]), 1),
        "score_cost_ratio_all_vs_top1": round(median_ratio(cpu_score["all"], cpu_score["top1"]), 2),
        "phase1_epoch_s_cached": round(statistics.median(cpu_epoch["cached"]), 3),
        "phase1_epoch_s_recompute": round(statistics.median(cpu_epoch["recompute"]), 3),
        "recompute_vs_cached_epoch_ratio": round(median_ratio(cpu_epoch["recompute"], cpu_epoch["cached"]), 2),
        "cached_vs_recompute_max_abs_diff": agree,
        "cache_build_s": round(build_s, 3), "cache_mb": round(written["bytes"] / 2**20, 1),
        "cache_shards": written["shards"], "cached_pass_rss_growth_mb": growth["stream"],
        "whole_cache_in_memory_rss_growth_mb": growth["whole"],
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
