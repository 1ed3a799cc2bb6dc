"""A probe for the device policy: a global forward pre-hook that checks, for every module forward anywhere
(the backbone's blocks, the tops and their peft wrappers, the router, the aggregators), that the module's
own parameters and every tensor it is called with (positional and keyword, nested in tuples) are on the
expected device. Shared by tests/test_device.py (CPU) and tests/gpu/test_cuda.py (CUDA).
"""

from __future__ import annotations

from collections import Counter

import torch
from tiny import TINY_LORA, pairwise_samples
from torch import nn

from dmoerm.modeling.aggregator import AggregatorConfig
from dmoerm.modeling.reward_model import CategoryModel, RewardModel, SingleRewardModel, score_with_baseline
from dmoerm.modeling.router import RouterInput, context_features
from dmoerm.modeling.top import attach_experts
from dmoerm.training.features import TrunkCache
from dmoerm.training.loop import FitHooks, TrainConfig
from dmoerm.training.phases import (
    capability_groups,
    phase3_features,
    train_aggregator,
    train_expert,
    train_router,
    train_top,
)


def _tensors(obj: object):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for x in obj:
            yield from _tensors(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x)


class DeviceProbe:
    """``with DeviceProbe(device) as probe: ...``; then ``probe.wrong`` lists what was elsewhere and
    ``probe.calls`` counts the forwards seen per module class."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.wrong: list[str] = []
        self.calls: Counter[str] = Counter()

    def _same(self, t: torch.Tensor) -> bool:
        return t.device.type == self.device.type and (self.device.index is None or t.device == self.device)

    def _check(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        kind = type(module).__name__
        self.calls[kind] += 1
        for name, p in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if not self._same(p):
                self.wrong.append(f"{kind}.{name} on {p.device}")
        for t in _tensors((args, kwargs)):
            if not self._same(t):
                self.wrong.append(f"an input of {kind} on {t.device}")

    def __enter__(self) -> DeviceProbe:
        self._handle = nn.modules.module.register_module_forward_pre_hook(
            lambda m, args: self._check(m, args, {}))
        self._kw_handles: list = []
        return self

    def watch(self, *modules: nn.Module) -> None:
        """Also check the keyword arguments of every submodule of ``modules`` (the global hook sees
        positional arguments only)."""
        for root in modules:
            for m in root.modules():
                self._kw_handles.append(m.register_forward_pre_hook(
                    lambda mod, args, kwargs: self._check_kwargs(mod, kwargs), with_kwargs=True))

    def _check_kwargs(self, module: nn.Module, kwargs: dict) -> None:
        for t in _tensors(kwargs):
            if not self._same(t):
                self.wrong.append(f"a keyword input of {type(module).__name__} on {t.device}")

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()
        for h in self._kw_handles:
            h.remove()


# ---- every phase and scoring on one backbone, as the pipeline runs them ------------------------------
CATEGORIES = {"chat": ["empathy", "logic"], "qa": ["correctness"]}


def probe_samples() -> list:
    """16 two-response samples, 8 per category, each carrying labels for its category's capabilities."""
    samples = pairwise_samples(8, "chat") + pairwise_samples(8, "qa", offset=8)
    for i, s in enumerate(samples):
        s.capability_prefs = {c: [(0, 1)] if (i + j) % 3 else [(1, 0)] for j, c in enumerate(CATEGORIES[s.category])}
    return samples


def run_every_phase(backbone, cache_dtype: torch.dtype, probe: DeviceProbe) -> dict:
    """Router, phase 1, baseline, phase-2 experts, phase-3 features and aggregator, then scoring (DMoERM,
    the baseline and both from one trunk pass), each on ``backbone``'s device in its precision, under
    ``probe`` (every module's keyword inputs watched as well)."""
    samples = probe_samples()
    train = [s for i, s in enumerate(samples) if i % 4 != 3]
    val = [s for i, s in enumerate(samples) if i % 4 == 3]
    names = list(CATEGORIES)
    settings = TrainConfig(lr=1e-3, epochs=1, batch_size=4, max_steps=2, warmup_ratio=0.0, patience=1)
    hooks = FitHooks(progress=False)
    probe.watch(backbone.model)

    inputs = RouterInput().resolve(backbone)
    x = context_features(backbone, [s.context for s in train], inputs, batch_size=4)
    vx = context_features(backbone, [s.context for s in val], inputs, batch_size=4)
    y = torch.tensor([names.index(s.category) for s in train])
    vy = torch.tensor([names.index(s.category) for s in val])
    router, _ = train_router(x, y, vx, vy, names, TrainConfig(lr=1e-2, epochs=2, batch_size=4, patience=2),
                             inputs=inputs, device=backbone.device)

    cache = TrunkCache(backbone, batch_size=4, dtype=cache_dtype)
    cache.add_samples(samples, progress=False)
    baseline, _ = train_top(backbone, cache, train, val, settings, desc="baseline", hooks=hooks)
    probe.watch(baseline)
    categories, features = {}, {}
    for name, caps in CATEGORIES.items():
        cat_train = [s for s in train if s.category == name]
        cat_val = [s for s in val if s.category == name]
        top, _ = train_top(backbone, cache, cat_train, cat_val, settings, desc=f"{name}/phase1", hooks=hooks)
        experts = attach_experts(top, caps, TINY_LORA)
        probe.watch(experts)
        for cap in caps:
            train_expert(experts, cap, backbone, cache, capability_groups(cat_train, cap, cache),
                         capability_groups(cat_val, cap, cache), settings, hooks=hooks)
        feats, tg, vg = phase3_features(experts, caps, backbone, cache, cat_train, cat_val, batch_size=4,
                                        progress=False)  # (R, K, H)
        agg, _ = train_aggregator(feats, tg, vg, AggregatorConfig(), settings, hooks=hooks, device=backbone.device)
        probe.watch(agg)
        categories[name] = CategoryModel(name, caps, experts, agg)
        features[name] = (feats, vg, cat_val)

    model = RewardModel(backbone, router, categories, batch_size=4)
    single = SingleRewardModel(backbone, baseline, batch_size=4)
    contexts = [s.context for s in val for _ in s.responses]
    responses = [r for s in val for r in s.responses]
    scores = model.score(contexts, responses)
    single_scores = single.score(contexts, responses)
    both = score_with_baseline(model, single, val)
    routes = model.route([s.context for s in val])  # the separate context pass (cut contexts route so)
    return {"model": model, "single": single, "scores": scores, "single_scores": single_scores, "both": both,
            "features": features, "router": router, "val": val, "routes": routes}


def scored_and_cached(out: dict) -> tuple[list[float], list[float]]:
    """(each validation row's reward from scoring with its known category, its category's aggregator on the
    expert states phase 3 cached for the row): the same model input, so equal up to batch composition."""
    scored, cached = [], []
    for name, (feats, vg, cat_val) in out["features"].items():
        agg = out["model"].categories[name].aggregator
        with torch.no_grad():
            for g in vg:
                cached += agg(feats[g.rows].to(next(agg.parameters()).device, torch.float32)).tolist()
        scored += [s.reward for per in out["model"].score_samples(cat_val, use_known_category=True) for s in per]
    return scored, cached
