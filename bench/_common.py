"""Shared pieces of the model benchmarks: real hh-rlhf rows, MiniLM categories with perturbed experts, and
interleaved timing that reports ratios measured within the same repetition (the machine is shared)."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from dmoerm.data.loaders import SourceConfig, load_source
from dmoerm.data.records import Sample, Turn
from dmoerm.modeling.aggregator import Aggregator
from dmoerm.modeling.backbone import Backbone
from dmoerm.modeling.reward_model import CategoryModel
from dmoerm.modeling.top import LoraConfig, TopStack, attach_experts

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "hh-rlhf-demo"
Timings = dict[str, list[float]]  # name -> seconds per repetition
CAPABILITY_NAMES = ["correctness", "logic", "empathy", "readability", "content_richness", "specificity"]


def setup(threads: int) -> None:
    """Offline hub and a fixed torch thread count."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(threads)


def load_samples(num_per_file: int) -> list[Sample]:
    """The first ``num_per_file`` samples of each vendored hh-rlhf file, interleaved (two categories)."""
    files = [("helpful", DATA / "helpful.jsonl.gz"), ("red_team", DATA / "harmless-base.jsonl.gz")]
    per_file = [load_source(SourceConfig(path=str(p), format="hh", category=c, limit=num_per_file)).samples
                for c, p in files]
    return [s for pair in zip(*per_file) for s in pair]


def load_rows(num_rows: int) -> tuple[list[list[Turn]], list[str]]:
    """``num_rows`` (context, response) rows of ``load_samples``, both responses of each sample."""
    samples = load_samples((num_rows + 3) // 4)
    contexts = [s.context for s in samples for _ in s.responses]
    return contexts[:num_rows], [r for s in samples for r in s.responses][:num_rows]


def perturb_(module: nn.Module, seed: int, std: float = 0.02) -> None:
    """Move every LoRA B (zero at init) and every value head away from its init so adapters do real work."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name or "value_head" in name:
                p.add_(torch.randn(p.shape, generator=gen) * std)


def build_category(backbone: Backbone, name: str, num_experts: int, seed: int) -> CategoryModel:
    """A category as phase 3 leaves it: a TopStack with ``num_experts`` perturbed LoRA experts + aggregator."""
    torch.manual_seed(seed)
    capabilities = CAPABILITY_NAMES[:num_experts]
    experts = attach_experts(TopStack(backbone), capabilities, LoraConfig())
    perturb_(experts, seed)
    return CategoryModel(name, capabilities, experts.eval(), Aggregator(num_experts, backbone.hidden_size).eval())


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> tuple[Timings, Timings]:
    """(CPU seconds, wall seconds) per call of each fn, alternating fns within every repetition (order
    rotated per repetition). With one torch thread, the process CPU time is the work done, whatever the
    load other processes put on the machine; wall time is reported beside it."""
    names = list(fns)
    cpu: Timings = {n: [] for n in names}
    wall: Timings = {n: [] for n in names}
    for rep in range(repeats):
        for n in names[rep % len(names):] + names[: rep % len(names)]:
            c, w = time.process_time(), time.perf_counter()
            fns[n]()
            cpu[n].append(time.process_time() - c)
            wall[n].append(time.perf_counter() - w)
    return cpu, wall


def median_ratio(num: list[float], den: list[float]) -> float:
    """Median over repetitions of num[i] / den[i] (both timed in the same repetition)."""
    return statistics.median(a / b for a, b in zip(num, den))
