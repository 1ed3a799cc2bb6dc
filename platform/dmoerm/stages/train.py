"""Stages ``trunk``, ``phase1``/``baseline`` and ``experts``: the frozen trunk's hidden states of every
training row, computed once; phase 1 per category (and the single-RM baseline); one capability expert."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from safetensors.torch import load_file
from torch import nn

from dmoerm.bundle import save_tensors
from dmoerm.config import PipelineConfig
from dmoerm.data.records import Sample
from dmoerm.modeling.top import TopStack, attach_experts, owned_by
from dmoerm.stages.base import backbone_for, model_id
from dmoerm.stages.budget import baseline_train_samples
from dmoerm.stages.data import splits_of
from dmoerm.stages.labels import capability_samples
from dmoerm.stages.search import baseline_settings
from dmoerm.stages.store import StageStore
from dmoerm.training.features import TrunkCache, load_trunk_cache, row_key, save_trunk_cache
from dmoerm.training.loop import FitHooks, FitResult
from dmoerm.training.phases import capability_groups, train_expert, train_top


# ---- trunk features -------------------------------------------------------------------------------
def trunk_step(cfg: PipelineConfig, store: StageStore, route_key: str, label_key: str) -> str:
    """Trunk states of every row a later stage trains or validates on: phase 1, phase 3, validation and
    every capability label's rows."""
    key = store.key(route=route_key, labels=label_key, model=model_id(cfg))
    if store.done("trunk", key) is None:
        splits = splits_of(store, "route", route_key)
        cache = TrunkCache(backbone_for(cfg), batch_size=cfg.model.feature_batch_size)
        rows = splits["phase1"] + splits["phase3"] + splits["val"]
        for entry in store.get_json("labels", label_key, "index.json"):
            rows += store.get_samples("labels", label_key, entry["file"])
        cache.add_samples(rows)
        save_trunk_cache(cache, str(store.local("trunk", key) / "trunk.safetensors"),
                         getattr(torch, cfg.model.precision))
        store.mark_done("trunk", key, {"rows": len(cache)})
    return key


def trunk_cache(cfg: PipelineConfig, store: StageStore, trunk_key: str, samples: list[Sample]) -> TrunkCache:
    """The cached rows of ``samples`` only (read lazily from the stage's file)."""
    keys = [row_key(s.context, r) for s in samples for r in s.responses]
    return load_trunk_cache(backbone_for(cfg), str(store.path("trunk", trunk_key, "trunk.safetensors")), keys)


def checkpoint_hooks(store: StageStore, stage: str, key: str) -> FitHooks:
    """Epoch checkpoints of a fit under its stage folder, and the last one to resume from."""
    from dmoerm.checkpoint import load_state, save_state

    ckpt = store.local(stage, key) / "checkpoint"
    resume = load_state(ckpt) if (ckpt / "state.json").exists() else None
    return FitHooks(checkpoint=lambda state: save_state(ckpt, state), resume=resume, progress=False)


# ---- phase 1 and the baseline --------------------------------------------------------------------
def top_step(cfg: PipelineConfig, store: StageStore, route_key: str, trunk_key: str, category: str | None,
             label_key: str | None = None, search_key: str | None = None) -> str:
    """Phase 1 for ``category`` on its phase-1 samples, or (``category`` None) the single-RM baseline on every
    human-ranked sample any part of DMoERM learnt from (``stages.budget``: phase 1, phase 3 and the label
    sources of ``label_key``), with its searched settings when ``search_key`` is given."""
    stage = "phase1" if category else "baseline"
    settings = cfg.phase1
    if category is None:
        if label_key is None:
            raise ValueError("the baseline needs the labels stage's key (its label-source samples)")
        if search_key is not None:
            settings = baseline_settings(store.get_json("search", search_key, "best.json")["config"], cfg.phase1,
                                         trial=False)
    parts = {"labels": label_key} if category is None else {}
    key = store.key(route=route_key, trunk=trunk_key, category=category, settings=settings, seed=cfg.seed, **parts)
    if store.done(stage, key) is None:
        splits = splits_of(store, "route", route_key, category)
        train = splits["phase1"] if category else baseline_train_samples(store, route_key, label_key)
        cache = trunk_cache(cfg, store, trunk_key, train + splits["val"])
        top, result = train_top(backbone_for(cfg), cache, train, splits["val"], settings, seed=cfg.seed,
                                desc=f"{category}/phase1" if category else "baseline",
                                hooks=checkpoint_hooks(store, stage, key))
        save_tensors(top.state_dict(), store.local(stage, key) / "top.safetensors")
        store.mark_done(stage, key, {"val_accuracy": result.best_val_accuracy, "steps": result.steps,
                                     "train_samples": len(train)})
    return key


def load_top(cfg: PipelineConfig, store: StageStore, stage: str, key: str) -> TopStack:
    top = TopStack(backbone_for(cfg))
    top.load_state_dict(load_file(str(store.path(stage, key, "top.safetensors"))))
    return top


# ---- phase 2: one expert ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ExpertInputs:
    """Everything that identifies one capability expert's training."""

    route: str
    labels: str
    trunk: str
    phase1: str
    category: str
    capability: str


def expert_key(cfg: PipelineConfig, store: StageStore, inputs: ExpertInputs) -> str:
    return store.key(inputs=inputs, settings=cfg.phase2, lora=cfg.model.lora, seed=cfg.seed)


def category_experts(cfg: PipelineConfig, store: StageStore, phase1_key: str, category: str) -> nn.Module:
    """The category's phase-1 top with one fresh LoRA adapter per capability, initialised from the run's
    seed (not from whatever state this process's RNG is in), so every executor starts from the same."""
    top = load_top(cfg, store, "phase1", phase1_key)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return attach_experts(top, cfg.category(category).capabilities, cfg.model.lora)


def adapter_tensors(experts: nn.Module, capability: str) -> dict[str, torch.Tensor]:
    """The parameters owned by one expert: its LoRA matrices and its value-head copy."""
    mine = {k: v for k, v in experts.state_dict().items() if owned_by(k, capability)}
    if not mine:
        raise ValueError(f"no parameters found for expert {capability!r}")
    return mine


def train_expert_step(cfg: PipelineConfig, store: StageStore, inputs: ExpertInputs, key: str, hooks: FitHooks,
                      wrap: Callable[[nn.Module], nn.Module] | None = None, placement: dict | None = None
                      ) -> FitResult:
    """Train one capability expert; rank 0 of ``hooks.shard`` then saves it under ``key`` (its own tensors,
    its training curves, DONE with its ``train_seconds``). ``wrap`` wraps the model for data parallelism
    (e.g. DDP); ``placement`` (where it ran: node, worker group) goes into its DONE info and metrics."""
    rank, world = hooks.shard
    started = time.perf_counter()
    train = capability_samples(store, inputs.labels, inputs.category, inputs.capability, "train")
    val = capability_samples(store, inputs.labels, inputs.category, inputs.capability, "val")
    cache = trunk_cache(cfg, store, inputs.trunk, train + val)
    experts = category_experts(cfg, store, inputs.phase1, inputs.category)
    curves: dict[str, list[list[float]]] = {"train_loss": [], "val_accuracy": []}

    def log_metric(name: str, value: float, step: int) -> None:
        curves[name.rsplit("/", 1)[-1]].append([step, value])
        if hooks.log_metric:
            hooks.log_metric(name, value, step)

    cap = inputs.capability
    result = train_expert(experts, cap, backbone_for(cfg), cache, capability_groups(train, cap, cache),
                          capability_groups(val, cap, cache), cfg.phase2, seed=cfg.seed,
                          desc=f"{inputs.category}/expert/{cap}", wrap=wrap,
                          hooks=dataclasses.replace(hooks, log_metric=log_metric))
    if rank == 0:
        resumed = {"resumed_from_step": result.resumed_from_step, "workers": world, **(placement or {})}
        info = {"val_accuracy": result.best_val_accuracy, "steps": result.steps, **resumed,
                "train_seconds": round(time.perf_counter() - started, 2)}
        store.put_json("experts", key, "metrics.json", {**curves, "history": result.history, **resumed})
        save_tensors(adapter_tensors(experts, cap), store.local("experts", key) / "adapter.safetensors")
        store.mark_done("experts", key, info)
    return result


def expert_step(cfg: PipelineConfig, store: StageStore, inputs: ExpertInputs) -> str:
    """One expert in this process, checkpointed every epoch under its stage folder (a re-run resumes)."""
    key = expert_key(cfg, store, inputs)
    if store.done("experts", key) is None:
        train_expert_step(cfg, store, inputs, key, checkpoint_hooks(store, "experts", key))
    return key


def load_experts(cfg: PipelineConfig, store: StageStore, phase1_key: str, expert_keys: dict[str, str],
                 category: str) -> nn.Module:
    """The category's TopStack with every trained adapter loaded (strict: every adapter key present)."""
    experts = category_experts(cfg, store, phase1_key, category)
    state = experts.state_dict()
    for cap in cfg.category(category).capabilities:
        tensors = load_file(str(store.path("experts", expert_keys[cap], "adapter.safetensors")))
        missing = set(adapter_tensors(experts, cap)) - set(tensors)
        if missing:
            raise ValueError(f"expert {category}/{cap}: adapter file lacks {sorted(missing)[:3]}")
        state.update(tensors)
    experts.load_state_dict(state)
    return experts.eval()
