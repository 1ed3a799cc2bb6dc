"""Stages ``trunk``, ``phase1``/``baseline`` and ``experts``: the trunk-cache policy of the run (and, when
cached, the frozen trunk's hidden states of every training row, computed once, in shards); phase 1 per
category (and the single-RM baseline); one capability expert."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from dmoerm import storage
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
from dmoerm.training.features import (
    CachedTrunk,
    RecomputedTrunk,
    TrunkFeatures,
    TrunkShardWriter,
    choose_trunk_policy,
    estimate_trunk_bytes,
    row_key,
    sample_rows,
)
from dmoerm.training.loop import FitHooks, FitResult
from dmoerm.training.phases import capability_groups, train_expert, train_top

logger = logging.getLogger(__name__)


# ---- trunk features -------------------------------------------------------------------------------
def trunk_groups(store: StageStore, route_key: str, label_key: str) -> list[list[Sample]]:
    """The samples of every row a later stage trains or validates on, in the groups stages read together:
    phase 1, phase 3, validation, then each capability label file."""
    splits = splits_of(store, "route", route_key)
    groups = [splits["phase1"], splits["phase3"], splits["val"]]
    for entry in store.get_json("labels", label_key, "index.json"):
        groups.append(store.get_samples("labels", label_key, entry["file"]))
    return groups


def trunk_step(cfg: PipelineConfig, store: StageStore, route_key: str, label_key: str) -> str:
    """The trunk-cache policy of this run's rows (phase 1, phase 3, validation and every capability label's
    rows), and with the cached one their trunk states, in shards. The estimate and the choice are logged
    and recorded in DONE.json; the choice is part of the key (the stage holds shards or not)."""
    m = cfg.model
    backbone = backbone_for(cfg)
    groups = trunk_groups(store, route_key, label_key)
    dtype = getattr(torch, m.precision)
    estimate = estimate_trunk_bytes(backbone, [row for g in groups for row in sample_rows(g)], dtype)
    policy, why = choose_trunk_policy(m.trunk_cache, estimate.bytes, m.trunk_cache_budget_gb,
                                      embeddings_only=backbone.split == 0)
    key = store.key(route=route_key, labels=label_key, model=model_id(cfg), trunk_policy=policy)
    if store.done("trunk", key) is None:
        info = {"policy": policy, "reason": why, "rows": estimate.rows, "mean_tokens": round(estimate.mean_tokens, 2),
                "estimate_bytes": estimate.bytes, "estimate_gb": round(estimate.bytes / 1e9, 4),
                "budget_gb": m.trunk_cache_budget_gb, "mode": m.trunk_cache}
        logger.info("trunk features: %d rows x %.1f tokens x H=%d in %s ~ %.3g GB: %s (%s)", estimate.rows,
                    estimate.mean_tokens, backbone.hidden_size, m.precision, estimate.bytes / 1e9, policy, why)
        if policy == "cached":
            writer = TrunkShardWriter(backbone, store.local("trunk", key), dtype=dtype,
                                      shard_bytes=max(1, int(m.trunk_shard_mb * 2**20)),
                                      batch_size=m.feature_batch_size)
            for g in groups:
                writer.add_samples(g)
            written = writer.close()
            info.update(rows=written["rows"], shards=written["shards"], bytes=written["bytes"])
            logger.info("trunk cache: %d rows in %d shards, %.3g GB", written["rows"], written["shards"],
                        written["bytes"] / 1e9)
        store.mark_done("trunk", key, info)
    return key


def _fetch(store: StageStore, stage: str, key: str) -> Callable[[str], Path]:
    """A stage file's local path, downloaded (streamed, then renamed into place, so concurrent readers
    never see half a file) when the storage is remote and this machine lacks it."""
    def fetch(name: str) -> Path:
        local = store.local(stage, key) / name
        if store.remote and not local.exists():
            with storage.open_uri(store.uri(stage, key, name), "rb") as src, \
                    storage.open_uri(str(local), "wb") as dst:
                shutil.copyfileobj(src, dst)
        return local

    return fetch


def trunk_cache(cfg: PipelineConfig, store: StageStore, trunk_key: str, samples: list[Sample]) -> TrunkFeatures:
    """The trunk states of ``samples``' rows under the policy the trunk stage chose: its shards (read per
    batch, fetched when first needed) or the trunk recomputed per batch."""
    info = store.done("trunk", trunk_key)
    if info is None or "policy" not in info:
        raise ValueError(f"trunk stage {trunk_key} is not done (or was built by an older version without a "
                         f"trunk-cache policy); run the trunk stage first")
    if info["policy"] == "cached":
        return CachedTrunk(_fetch(store, "trunk", trunk_key), [row_key(c, r) for c, r in sample_rows(samples)])
    return RecomputedTrunk(backbone_for(cfg), getattr(torch, cfg.model.precision)).add_samples(samples)


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
