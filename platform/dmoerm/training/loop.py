"""One pairwise training loop for every reward head: phase 1, phase 2 experts, the aggregator, the
single-RM baseline. Length-bucketed batches of whole samples, early stopping on validation pairwise
accuracy (the best state is restored), seeded, resumable from a state dict at epoch boundaries.

``fit_pairwise`` reads as its pieces: the batch plan (``_Plan``), the optimiser and its schedule
(``_optimizer``), one optimiser step (``_train_step``), early stopping on the best state (``_Selection``)
and the epoch checkpoint; what a caller plugs in (metrics, checkpoints, resume, data-parallel shard,
progress bar) is one ``FitHooks``.

Device: the module trains on ``device`` (default: where its parameters are); the reward function returns
rewards there (it moves its batch: ``dmoerm.device.to_device``) and the loss's pair indices follow them.
Precision is the module's own business (``TopStack`` autocasts its blocks), so this loop needs no
gradient scaler (bf16 has float32's range).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from dmoerm.device import module_device
from dmoerm.losses import pair_correct, pairwise_loss

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Optimisation settings of one training phase."""

    lr: float = 1e-4
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    epochs: int = 3
    """Maximum number of passes over the training data."""
    batch_size: int = 32
    """Responses per batch (whole samples are kept together)."""
    patience: int = 2
    """Evaluations without a better validation accuracy before stopping early."""
    evals_per_epoch: int = 1
    """Validation evaluations per epoch (early stopping is checked at each)."""
    max_steps: int | None = None
    """Stop after this many optimiser steps (None: no limit)."""
    warmup_ratio: float = 0.05
    """Share of the steps with a linearly rising learning rate."""
    grad_clip: float = 1.0
    """Max gradient norm (0 disables clipping)."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.epochs < 1 or self.batch_size < 2 or self.patience < 1 or self.evals_per_epoch < 1:
            raise ValueError("epochs, patience and evals_per_epoch must be >= 1 and batch_size >= 2")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")


@dataclass
class Group:
    """One sample's responses (global row ids) and its ``(better, worse)`` pairs as local indices."""

    rows: list[int]
    pairs: list[tuple[int, int]]


@dataclass
class FitResult:
    best_val_accuracy: float
    steps: int
    epochs_run: float
    stopped_early: bool
    history: list[dict] = field(default_factory=list)
    resumed_from_step: int = 0
    """Step of the checkpoint this fit resumed from (0: a fresh start)."""


RewardFn = Callable[[Sequence[int]], torch.Tensor]  # global row ids -> (N,) rewards
MetricFn = Callable[[str, float, int], None]  # (name, value, step)
KILL_WORKER_ENV = "DMOERM_TEST_KILL_WORKER_AT"
"""Tests only: ``<desc>:<step>`` makes the fit called ``desc`` kill its process (rank 0) after that
optimiser step, unless it resumed from a checkpoint: a worker dies once, its replacement carries on."""


@dataclass
class FitHooks:
    """What a caller plugs into a fit; none of it changes what is learned."""

    log_metric: MetricFn | None = None
    """Called as ``(f"{desc}/train_loss" or f"{desc}/val_accuracy", value, step)``."""
    checkpoint: Callable[[dict], None] | None = None
    """Receives a resumable state dict after every epoch."""
    resume: dict | None = None
    """A state dict ``checkpoint`` received: the fit continues from it."""
    shard: tuple[int, int] = (0, 1)
    """``(rank, world)``: data-parallel workers see the same seeded batch order and each takes every
    ``world``-th batch (equal counts, so collective ops stay in step); DDP averages the gradients."""
    progress: bool = True
    """A progress bar over the optimiser steps."""


def make_batches(groups: Sequence[Group], lengths: Sequence[int], batch_size: int, rng: random.Random
                 ) -> list[list[int]]:
    """Length-bucketed batches of group indices: similar lengths pad little; batch order shuffled."""
    keyed = sorted(range(len(groups)), key=lambda g: (max(lengths[r] for r in groups[g].rows), rng.random()))
    batches, cur, rows = [], [], 0
    for g in keyed:
        cur.append(g)
        rows += len(groups[g].rows)
        if rows >= batch_size:
            batches.append(cur)
            cur, rows = [], 0
    if cur:
        batches.append(cur)
    rng.shuffle(batches)
    return batches


def _flatten(groups: Sequence[Group], chosen: Sequence[int]) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    rows, pairs, owner = [], [], []
    for gi in chosen:
        g = groups[gi]
        base = len(rows)
        rows.extend(g.rows)
        pairs.extend((base + b, base + w) for b, w in g.pairs)
        owner.extend([gi] * len(g.pairs))
    return rows, torch.tensor(pairs, dtype=torch.long).view(-1, 2), torch.tensor(owner, dtype=torch.long)


@torch.no_grad()
def evaluate_groups(module: nn.Module, reward_fn: RewardFn, groups: Sequence[Group], lengths: Sequence[int],
                    batch_size: int = 64) -> tuple[float, float]:
    """(pairwise accuracy, mean loss) over ``groups``; NaN accuracy when there are no pairs."""
    was_training = module.training
    module.eval()
    correct = total = 0
    loss_sum = 0.0
    batches = make_batches(groups, lengths, batch_size, random.Random(0))
    for chosen in batches:
        rows, pairs, owner = _flatten(groups, chosen)
        if pairs.numel() == 0:
            continue
        rewards = reward_fn(rows).float()
        pairs = pairs.to(rewards.device)
        correct += int(pair_correct(rewards, pairs).sum())
        total += pairs.size(0)
        loss_sum += float(pairwise_loss(rewards, pairs)) * pairs.size(0)
    module.train(was_training)
    return (correct / total if total else float("nan")), (loss_sum / total if total else float("nan"))


class _Plan:
    """The seeded batch order of every epoch (this worker's share of it), the step budget and the
    evaluation points within an epoch."""

    def __init__(self, train: Sequence[Group], lengths: Sequence[int], settings: TrainConfig, seed: int,
                 shard: tuple[int, int]) -> None:
        self.train, self.lengths, self.settings, self.seed = train, lengths, settings, seed
        self.rank, self.world = shard
        self.steps_per_epoch = len(self.batches(-1))
        total = settings.epochs * self.steps_per_epoch
        self.total = total if settings.max_steps is None else min(total, settings.max_steps)
        n = settings.evals_per_epoch
        self.eval_points = {round(self.steps_per_epoch * (i + 1) / n) for i in range(n)}

    def batches(self, epoch: int) -> list[list[int]]:
        """Epoch ``epoch``'s batches of group indices (-1: the first batch order, to count steps)."""
        rng = random.Random(self.seed if epoch < 0 else self.seed * 1000 + epoch)
        batches = make_batches(self.train, self.lengths, self.settings.batch_size, rng)
        return batches[self.rank::self.world][: len(batches) // self.world] if self.world > 1 else batches


def _optimizer(params: list[nn.Parameter], settings: TrainConfig, total: int
               ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with a linear warm-up over ``warmup_ratio`` of the steps, then a linear decay to 0."""
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    warmup = int(settings.warmup_ratio * total)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, warmup)) * max(0.0, 1 - max(0, s - warmup) / max(1, total - warmup)))
    return opt, sched


def _train_step(reward_fn: RewardFn, params: list[nn.Parameter], groups: Sequence[Group], chosen: Sequence[int],
                opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LambdaLR, grad_clip: float) -> float:
    """One optimiser step on the batch ``chosen``; returns its loss."""
    rows, pairs, owner = _flatten(groups, chosen)
    rewards = reward_fn(rows).float()  # (N,) on the module's device
    loss = pairwise_loss(rewards, pairs.to(rewards.device), owner.to(rewards.device))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    sched.step()
    return loss.item()


class _Selection:
    """Early stopping on validation pairwise accuracy, keeping a copy of the best trainable state. With no
    validation pairs there is nothing to select on: the latest state is kept and training never stops."""

    def __init__(self, module: nn.Module, params: list[nn.Parameter], patience: int, state: dict) -> None:
        ids = {id(p) for p in params}
        self.trainable = {k for k, p in module.named_parameters() if id(p) in ids}
        self.module, self.patience, self.state = module, patience, state

    def update(self, acc: float, val_loss: float) -> bool:
        """Record one evaluation; True when training should stop."""
        s = self.state
        no_val = math.isnan(acc) and math.isnan(val_loss)
        score = acc if not math.isnan(acc) else -val_loss if not no_val else -math.inf
        if no_val or score > s["best"] or s["best_state"] is None:
            s["best"], s["bad"] = score, 0
            s["best_state"] = {k: v.detach().clone() for k, v in self.module.state_dict().items()
                               if k in self.trainable}
            return False
        s["bad"] += 1
        return s["bad"] >= self.patience

    def restore(self) -> float:
        """Load the best state into the module; returns its validation accuracy (NaN: none)."""
        if self.state["best_state"] is not None:
            self.module.load_state_dict({**self.module.state_dict(), **self.state["best_state"]})
        return self.state["best"] if self.state["best"] != -math.inf else float("nan")


def _kill_if_injected(desc: str, step: int, rank: int, resumed: bool) -> None:
    """The worker-failure injection of :data:`KILL_WORKER_ENV` (tests only)."""
    target = os.environ.get(KILL_WORKER_ENV, "")
    if not target or resumed or rank != 0 or target.rpartition(":")[::2] != (desc, str(step)):
        return
    logger.warning("%s: %s=%s, this worker dies now", desc, KILL_WORKER_ENV, target)
    # Ray Train registers a reported checkpoint asynchronously; a real crash comes well after the last one.
    time.sleep(5)
    os._exit(1)


def fit_pairwise(module: nn.Module, params: list[nn.Parameter], reward_fn: RewardFn,
                 train: Sequence[Group], val: Sequence[Group], lengths: Sequence[int],
                 settings: TrainConfig, *, seed: int = 0, desc: str = "train", hooks: FitHooks | None = None,
                 device: torch.device | str | None = None) -> FitResult:
    """Train ``params`` of ``module`` with the pairwise loss; keep the state with the best val accuracy.
    ``device``: where ``module`` is moved to train (None: where its parameters already are)."""
    hooks = hooks or FitHooks()
    device = torch.device(device) if device is not None else module_device(module)
    module.to(device)  # in place: ``params`` stay the module's parameters
    rank, world = hooks.shard
    train = [g for g in train if g.pairs]
    if not train:
        raise ValueError(f"{desc}: no training pairs (every sample is a tie or has one response)")
    if len(train) < world:
        raise ValueError(f"{desc}: {len(train)} training samples cannot feed {world} data-parallel workers")
    plan = _Plan(train, lengths, settings, seed, hooks.shard)
    opt, sched = _optimizer(params, settings, plan.total)
    state = {"epoch": 0, "step": 0, "best": -math.inf, "best_state": None, "bad": 0, "history": []}
    if hooks.resume is not None:
        state.update({k: hooks.resume[k] for k in state})
        module.load_state_dict(hooks.resume["model"])
        opt.load_state_dict(hooks.resume["optim"])
        sched.load_state_dict(hooks.resume["sched"])
        logger.info("%s: resumed at epoch %d, step %d", desc, state["epoch"], state["step"])
    resumed_from = state["step"]
    selection = _Selection(module, params, settings.patience, state)
    log = hooks.log_metric or (lambda *_: None)
    stopped = False
    bar = tqdm(total=plan.total, initial=state["step"], desc=desc, unit="step", disable=not hooks.progress,
               leave=False)
    while state["epoch"] < settings.epochs and not stopped and state["step"] < plan.total:
        module.train()
        for i, chosen in enumerate(plan.batches(state["epoch"]), start=1):
            loss = _train_step(reward_fn, params, train, chosen, opt, sched, settings.grad_clip)
            state["step"] += 1
            bar.update(1)
            log(f"{desc}/train_loss", loss, state["step"])
            _kill_if_injected(desc, state["step"], rank, resumed_from > 0)
            if i in plan.eval_points or state["step"] >= plan.total:
                acc, vloss = evaluate_groups(module, reward_fn, val, lengths) if val else (float("nan"),) * 2
                state["history"].append({"step": state["step"], "val_accuracy": acc, "val_loss": vloss,
                                         "train_loss": loss})
                log(f"{desc}/val_accuracy", acc, state["step"])
                if stopped := selection.update(acc, vloss):
                    break
            if state["step"] >= plan.total:
                break
        state["epoch"] += 1
        if hooks.checkpoint is not None:
            hooks.checkpoint({**state, "model": module.state_dict(), "optim": opt.state_dict(),
                              "sched": sched.state_dict()})
    bar.close()
    best = selection.restore()
    module.eval()
    return FitResult(best_val_accuracy=best, steps=state["step"],
                     epochs_run=state["step"] / max(1, plan.steps_per_epoch), stopped_early=stopped,
                     history=copy.deepcopy(state["history"]), resumed_from_step=resumed_from)
