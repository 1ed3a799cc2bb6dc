"""Phase 2's worker groups: which experts share one worker group (one start-up, one backbone load).

A worker group trains its experts one after another, each with ``train_expert_step`` exactly as it trains
alone (same seed, same initial adapter, same batches, its own outputs under its own stage key), so
grouping changes where and when an expert trains, never what it learns: the in-process executor (every
expert in turn in one process) and any grouping build the same experts.

Why not one mixed-adapter pass per batch for a category's experts (one adapter per row, as the scorer
runs them)? The trunk is already cached, so the pass would share no trunk compute: the LoRA-wrapped top
blocks run once per adapter and row either way. It would only make bigger batches, and it would change
each expert's batches, optimiser steps and early stopping (results differ from the one-expert path);
peft also refuses ``adapter_names`` in training mode. The fixed costs (process start-up, backbone load,
Ray Train's worker group and teardown: ~15 s per trainer against ~10 s of training for a small expert on
a CPU) are what grouping pays once.

Policies (``platform.expert_resources.group``):

- ``expert``: one group (a Ray Train trainer) per expert.
- ``category``: one group (a trainer) per category.
- ``auto``: an expert of at least ``own_trainer_rows`` training responses x epochs gets its own trainer
  (data-parallel, checkpointed in shared storage); the others are packed into as many groups as the
  cluster runs at once (``expert_slots``), balancing rows x epochs (largest first onto the lightest
  group), each run as a plain Ray task.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dmoerm.config import PipelineConfig, ResourceConfig
from dmoerm.names import safe_name
from dmoerm.stages.labels import capability_samples
from dmoerm.stages.store import StageStore, stable_hash
from dmoerm.stages.train import ExpertInputs


@dataclass(frozen=True)
class ExpertGroup:
    """Experts that train one after another in one worker group."""

    name: str
    """Unique per membership (the Ray Train run name: its checkpoints never meet another group's)."""
    experts: tuple[tuple[ExpertInputs, str], ...]
    """``(inputs, stage key)`` in training order."""
    trainer: bool
    """A Ray Train trainer (data-parallel workers, checkpoints in shared storage, restarts); else one plain
    Ray task of one worker's resources (retried; resumes from the stage folder's epoch checkpoint)."""
    rows: int
    """Training responses x epochs of its experts: its size."""


def expert_rows(cfg: PipelineConfig, store: StageStore, inputs: ExpertInputs) -> int:
    """An expert's size: the responses of its training samples carrying its labels, times the epochs."""
    train = capability_samples(store, inputs.labels, inputs.category, inputs.capability, "train")
    responses = sum(len(s.responses) for s in train if s.capability_prefs.get(inputs.capability))
    return responses * cfg.phase2.epochs


def expert_slots(res: ResourceConfig, cluster: dict[str, float]) -> int:
    """How many one-worker groups the cluster runs at once: its CPUs, GPUs and custom resources over what
    one worker reserves (at least 1: a group then waits for resources like any Ray task)."""
    need = {"CPU": res.cpus_per_worker, **({"GPU": 1.0} if res.use_gpu else {}), **res.resources}
    return max(1, min(math.floor(cluster.get(r, 0.0) / amount + 1e-9) for r, amount in need.items()))


def _group(kind: str, members: list[tuple[ExpertInputs, str, int]], trainer: bool) -> ExpertGroup:
    if len(members) == 1:
        inputs, key, _ = members[0]
        name = f"expert-{safe_name(inputs.category)}-{safe_name(inputs.capability)}-{key}"
    else:
        name = f"{kind}-{stable_hash(sorted(k for _, k, _ in members))}"
    return ExpertGroup(name, tuple((i, k) for i, k, _ in members), trainer, sum(r for *_, r in members))


def plan_expert_groups(cfg: PipelineConfig, store: StageStore, inputs: list[ExpertInputs], keys: list[str],
                       slots: int) -> list[ExpertGroup]:
    """The worker groups of ``inputs`` (stage keys ``keys``) under ``platform.expert_resources.group``,
    largest first; ``slots``: how many groups the cluster runs at once (``expert_slots``)."""
    if len(inputs) != len(keys):
        raise ValueError(f"{len(inputs)} experts but {len(keys)} keys")
    res = cfg.platform.expert_resources
    sized = [(i, k, expert_rows(cfg, store, i)) for i, k in zip(inputs, keys)]
    if res.group == "expert":
        groups = [_group("expert", [m], True) for m in sized]
    elif res.group == "category":
        categories = dict.fromkeys(i.category for i, _, _ in sized)
        groups = [_group(f"experts-{safe_name(c)}", [m for m in sized if m[0].category == c], True)
                  for c in categories]
    else:
        own = [m for m in sized if m[2] >= res.own_trainer_rows]
        small = [m for m in sized if m[2] < res.own_trainer_rows]
        groups = [_group("expert", [m], True) for m in own]
        bins: list[list[tuple[ExpertInputs, str, int]]] = [[] for _ in range(min(len(small), max(1, slots)))]
        for m in sorted(small, key=lambda m: -m[2]):  # stable: equal sizes keep the pipeline's order
            min(bins, key=lambda b: sum(r for *_, r in b)).append(m)
        order = {k: n for n, (_, k, _) in enumerate(sized)}
        groups += [_group("experts", sorted(b, key=lambda m: order[m[1]]), False) for b in bins]
    return sorted(groups, key=lambda g: -g.rows)
