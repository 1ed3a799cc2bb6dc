"""The pairwise loss and accuracy on hand-made tensors (values computed by hand)."""

from __future__ import annotations

import math

import pytest
import torch

from dmoerm.data.records import Sample, Turn
from dmoerm.losses import pair_correct, pairwise_accuracy, pairwise_loss

NLS1 = 0.313261687  # -log sigmoid(1)
NLS2 = 0.126928011  # -log sigmoid(2)
LOG2 = 0.693147181  # -log sigmoid(0)


def _sample(ranks: list[int]) -> Sample:
    return Sample(id="s", context=[Turn("user", "q")], responses=[f"r{i}" for i in range(len(ranks))], ranks=ranks)


def test_single_pair_is_minus_log_sigmoid_of_the_margin():
    rewards = torch.tensor([1.0, 0.0])
    assert pairwise_loss(rewards, torch.tensor([[0, 1]])).item() == pytest.approx(NLS1, abs=1e-6)
    # the reverse pair (response 1 better) pays for the negative margin
    assert pairwise_loss(rewards, torch.tensor([[1, 0]])).item() == pytest.approx(NLS1 + 1.0, abs=1e-6)
    assert pairwise_loss(torch.zeros(2), torch.tensor([[0, 1]])).item() == pytest.approx(LOG2, abs=1e-6)


def test_gradient_raises_the_better_and_lowers_the_worse_reward():
    rewards = torch.tensor([0.0, 0.0], requires_grad=True)
    pairwise_loss(rewards, torch.tensor([[1, 0]])).backward()
    assert rewards.grad[1] < 0 < rewards.grad[0]  # descent raises r[1] (better), lowers r[0]
    assert rewards.grad[1].item() == pytest.approx(-0.5)


def test_per_sample_averaging_a_three_response_sample_weighs_like_a_pair():
    a, b = _sample([1, 2, 3]), _sample([1, 2])
    assert a.pairs() == [(0, 1), (0, 2), (1, 2)]
    rewards = torch.tensor([2.0, 1.0, 0.0, 0.0, 0.0])  # sample a: rows 0-2, sample b: rows 3-4
    pairs = torch.tensor(a.pairs() + [(3 + x, 3 + y) for x, y in b.pairs()])
    owner = torch.tensor([0, 0, 0, 1])
    mean_a = (2 * NLS1 + NLS2) / 3
    assert pairwise_loss(rewards, pairs, owner).item() == pytest.approx((mean_a + LOG2) / 2, abs=1e-6)
    # without owners every pair is its own sample: the 3-pair sample would weigh 3x
    assert pairwise_loss(rewards, pairs).item() == pytest.approx((2 * NLS1 + NLS2 + LOG2) / 4, abs=1e-6)
    # owner ids need not be contiguous or sorted
    assert pairwise_loss(rewards, pairs, torch.tensor([7, 7, 7, 2])).item() == pytest.approx(
        (mean_a + LOG2) / 2, abs=1e-6)


def test_empty_pairs_give_zero_loss_that_still_backpropagates_and_nan_accuracy():
    rewards = torch.tensor([0.3, -1.0], requires_grad=True)
    empty = torch.zeros(0, 2, dtype=torch.long)
    loss = pairwise_loss(rewards, empty, torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(rewards.grad, torch.zeros(2))
    assert math.isnan(pairwise_accuracy(rewards.detach(), empty))


def test_accuracy_counts_strictly_higher_better_rewards_and_ties_as_wrong():
    rewards = torch.tensor([3.0, 1.0, 1.0, 5.0])
    pairs = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0]])  # right, tie (wrong), wrong, right
    assert pair_correct(rewards, pairs).tolist() == [True, False, False, True]
    assert pairwise_accuracy(rewards, pairs) == pytest.approx(0.5)


@pytest.mark.parametrize(("ranks", "pairs"), [
    ([1, 2], [(0, 1)]),
    ([2, 1], [(1, 0)]),  # rank 1 = best, whatever its position
    ([2, 1, 3], [(1, 0), (0, 2), (1, 2)]),
    ([1, 1, 2], [(0, 2), (1, 2)]),  # the tie between 0 and 1 carries no preference
    ([3, 3], []),
])
def test_sample_pairs_are_better_first_and_exclude_ties(ranks, pairs):
    assert _sample(ranks).pairs() == pairs
