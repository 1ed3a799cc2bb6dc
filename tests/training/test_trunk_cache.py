"""Trunk features are computed once per distinct row, stored unpadded, and collate back exactly."""

from __future__ import annotations

import torch
from tiny import pairwise_samples, tiny_backbone

from dmoerm.training.features import TrunkCache
from dmoerm.training.phases import human_groups


def test_cache_dedups_rows_and_collate_reproduces_the_trunk():
    bb = tiny_backbone("llama")
    samples = pairwise_samples(5)
    cache = TrunkCache(bb, batch_size=3)
    cache.add_samples(samples + samples[:2], progress=False)
    assert len(cache) == 10
    cache.add_rows([(samples[0].context, samples[0].responses[0])], progress=False)
    assert len(cache) == 10  # already cached: nothing recomputed
    rows = [cache.row(s.context, r) for s in samples for r in s.responses]
    hidden, mask = cache.collate(rows)
    enc = bb.encode([s.context for s in samples for _ in s.responses], [r for s in samples for r in s.responses])
    expected = bb.trunk(enc)
    assert torch.equal(mask, enc.attention_mask)
    torch.testing.assert_close(hidden * mask[..., None], expected * enc.attention_mask[..., None], atol=1e-6, rtol=0)
    assert cache.lengths()[rows[0]] == int(enc.attention_mask[0].sum())


def test_human_groups_carry_better_first_pairs():
    bb = tiny_backbone("bert")
    samples = pairwise_samples(2)
    samples[1].ranks = [2, 1]
    cache = TrunkCache(bb)
    cache.add_samples(samples, progress=False)
    groups = human_groups(samples, cache)
    assert [g.pairs for g in groups] == [[(0, 1)], [(1, 0)]]
    assert groups[1].rows == [cache.row(samples[1].context, r) for r in samples[1].responses]

