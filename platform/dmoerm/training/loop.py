"""One pairwise training loop for every reward head: phase 1, phase 2 experts, the aggregator, the
single-RM baseline. Length-bucketed batches of whole samples, early stopping on validation pairwise
accuracy (the best state is restored), seeded, resumable from a state dict at epoch boundaries."""

from __future__ import annotations

import copy
import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from dmoerm.losses import pair_correct, pairwise_loss

logger = logging.getLogger(__name__)


@dataclass
class TrainSettings:
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
        rewards = reward_fn(rows)
        correct += int(pair_correct(rewards, pairs).sum())
        total += pairs.size(0)
        loss_sum += float(pairwise_loss(rewards, pairs)) * pairs.size(0)
    module.train(was_training)
    return (correct / total if total else float("nan")), (loss_sum / total if total else float("nan"))


def fit_pairwise(module: nn.Module, params: list[nn.Parameter], reward_fn: RewardFn,
                 train: Sequence[Group], val: Sequence[Group], lengths: Sequence[int],
                 settings: TrainSettings, *, seed: int = 0, desc: str = "train",
                 log_metric: Callable[[str, float, int], None] | None = None,
                 checkpoint: Callable[[dict], None] | None = None, resume: dict | None = None,
                 progress: bool = True, shard: tuple[int, int] = (0, 1)) -> FitResult:
    """Train ``params`` of ``module`` with the pairwise loss; keep the state with the best val accuracy.

    ``checkpoint`` receives a resumable state dict after every epoch; ``resume`` continues from one.
    ``shard=(rank, world)``: data-parallel workers see the same seeded batch order and take every
    ``world``-th batch (equal counts, so collective ops stay in step); gradients are averaged by DDP.
    """

    def epoch_batches(rng: random.Random) -> list[list[int]]:
        batches = make_batches(train, lengths, settings.batch_size, rng)
        return batches[rank::world][: len(batches) // world] if world > 1 else batches

    rank, world = shard
    train = [g for g in train if g.pairs]
    if not train:
        raise ValueError(f"{desc}: no training pairs (every sample is a tie or has one response)")
    if len(train) < world:
        raise ValueError(f"{desc}: {len(train)} training samples cannot feed {world} data-parallel workers")
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    steps_per_epoch = len(epoch_batches(random.Random(seed)))
    total = settings.epochs * steps_per_epoch
    if settings.max_steps is not None:
        total = min(total, settings.max_steps)
    warmup = int(settings.warmup_ratio * total)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, warmup)) * max(0.0, 1 - max(0, s - warmup) / max(1, total - warmup)))
    eval_points = {round(steps_per_epoch * (i + 1) / settings.evals_per_epoch) for i in
                   range(settings.evals_per_epoch)}
    state = {"epoch": 0, "step": 0, "best": -math.inf, "best_state": None, "bad": 0, "history": []}
    resumed_from = 0
    if resume is not None:
        state.update({k: resume[k] for k in ("epoch", "step", "best", "best_state", "bad", "history")})
        module.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optim"])
        sched.load_state_dict(resume["sched"])
        logger.info("%s: resumed at epoch %d, step %d", desc, state["epoch"], state["step"])
    resumed_from = state["step"]
    names = {id(p) for p in params}
    trainable = {k for k, p in module.named_parameters() if id(p) in names}

    def snapshot() -> dict:
        return {k: v.detach().clone() for k, v in module.state_dict().items() if k in trainable}

    stopped = False
    bar = tqdm(total=total, initial=state["step"], desc=desc, unit="step", disable=not progress, leave=False)
    while state["epoch"] < settings.epochs and not stopped and state["step"] < total:
        rng = random.Random(seed * 1000 + state["epoch"])
        module.train()
        for i, chosen in enumerate(epoch_batches(rng), start=1):
            rows, pairs, owner = _flatten(train, chosen)
            loss = pairwise_loss(reward_fn(rows), pairs, owner)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if settings.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
            opt.step()
            sched.step()
            state["step"] += 1
            bar.update(1)
            if log_metric:
                log_metric(f"{desc}/train_loss", loss.item(), state["step"])
            if i in eval_points or state["step"] >= total:
                acc, vloss = evaluate_groups(module, reward_fn, val, lengths) if val else (float("nan"),) * 2
                state["history"].append({"step": state["step"], "val_accuracy": acc, "val_loss": vloss,
                                         "train_loss": loss.item()})
                if log_metric:
                    log_metric(f"{desc}/val_accuracy", acc, state["step"])
                # No validation pairs: nothing to select on, so keep the latest state and never stop early.
                no_val = math.isnan(acc) and math.isnan(vloss)
                score = acc if not math.isnan(acc) else -vloss if not no_val else -math.inf
                if no_val or score > state["best"] or state["best_state"] is None:
                    state["best"], state["best_state"], state["bad"] = score, snapshot(), 0
                else:
                    state["bad"] += 1
                    if state["bad"] >= settings.patience:
                        stopped = True
                        break
            if state["step"] >= total:
                break
        state["epoch"] += 1
        if checkpoint is not None:
            checkpoint({**state, "model": module.state_dict(), "optim": opt.state_dict(),
                        "sched": sched.state_dict()})
    bar.close()
    if state["best_state"] is not None:
        module.load_state_dict({**module.state_dict(), **state["best_state"]})
    module.eval()
    best = state["best"] if state["best"] != -math.inf else float("nan")
    return FitResult(best_val_accuracy=best, steps=state["step"], epochs_run=state["step"] / max(1, steps_per_epoch),
                     stopped_early=stopped, history=copy.deepcopy(state["history"]), resumed_from_step=resumed_from)
