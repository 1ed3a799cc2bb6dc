"""Pairwise ranking loss and accuracy. Pure functions on hand-checkable tensors.

Convention everywhere: a pair is ``(better, worse)``, i.e. the response with the smaller rank first
(rank 1 = best). The loss is ``-log sigmoid(r_better - r_worse)`` averaged over the pairs of each sample,
then over samples, so a sample with many responses weighs as much as a pairwise one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pairwise_loss(rewards: torch.Tensor, pairs: torch.Tensor, pair_sample: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """Mean over samples of the mean ``-log sigmoid(r_b - r_w)`` over each sample's pairs.

    Args:
        rewards: (N,) one reward per response in the batch.
        pairs: (P, 2) long, rows ``(better_index, worse_index)`` into ``rewards``.
        pair_sample: (P,) long, the sample each pair belongs to; ``None`` treats every pair as its own
            sample (a plain mean over pairs).
    """
    if pairs.numel() == 0:
        return rewards.sum() * 0.0
    margin = rewards[pairs[:, 0]] - rewards[pairs[:, 1]]  # (P,)
    per_pair = -F.logsigmoid(margin)  # (P,)
    if pair_sample is None:
        return per_pair.mean()
    _, inverse = torch.unique(pair_sample, return_inverse=True)
    num_samples = int(inverse.max()) + 1
    sums = torch.zeros(num_samples, dtype=per_pair.dtype, device=per_pair.device).index_add_(0, inverse, per_pair)
    counts = torch.bincount(inverse, minlength=num_samples).to(per_pair.dtype)
    return (sums / counts).mean()


def pair_correct(rewards: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """(P,) bool: the better response got strictly the higher reward (a tie in reward counts as wrong)."""
    return rewards[pairs[:, 0]] > rewards[pairs[:, 1]]


def pairwise_accuracy(rewards: torch.Tensor, pairs: torch.Tensor) -> float:
    """Share of pairs ranked correctly; NaN when there are no pairs."""
    if pairs.numel() == 0:
        return float("nan")
    return pair_correct(rewards, pairs).float().mean().item()
