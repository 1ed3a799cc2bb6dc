"""Prompt-disjoint, deterministic, category-stratified splits for the three training phases.

Samples are grouped by :attr:`Sample.prompt_key` (a hash of the context), so one prompt never lands in two
splits. Each group is ranked by ``sha1(f"{seed}:{prompt_key}")``: the assignment depends on the seed and
the data only, never on the input order. Within each category (samples without one form their own
stratum) the ranked groups are cut by the cumulative fractions, so every category gets its share.
Fractions count prompts, not samples.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from dataclasses import dataclass

from dmoerm.data.records import Sample

SPLITS: tuple[str, ...] = ("phase1", "phase3", "val", "test")


@dataclass
class SplitConfig:
    """Fractions of prompts per split (each >= 0, summing to 1) and the seed."""

    phase1: float = 0.6
    """Phase 1: fine-tune the base model with a value head on human ranks (paper: about 60%)."""
    phase3: float = 0.2
    """Phase 3: train each category's aggregator on the remaining human-ranked samples."""
    val: float = 0.1
    """Validation: early stopping and model selection."""
    test: float = 0.1
    """Test: held-out pairwise accuracy, touched once."""
    seed: int = 0
    """Changes which prompts go where; the same seed always gives the same split."""

    def __post_init__(self) -> None:
        for name in SPLITS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0:
                raise ValueError(f"SplitConfig.{name} must be a fraction >= 0, got {value!r}")
        total = sum(self.fractions().values())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"SplitConfig fractions must sum to 1, got {total:.6g} "
                             f"({', '.join(f'{k}={v}' for k, v in self.fractions().items())})")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"SplitConfig.seed must be an integer, got {self.seed!r}")

    def fractions(self) -> dict[str, float]:
        """Split name -> fraction, in :data:`SPLITS` order."""
        return {name: float(getattr(self, name)) for name in SPLITS}


def hash_order(seed: int, key: str) -> str:
    """A seeded, input-order-free sort key: ``sha1(f"{seed}:{key}")``."""
    return hashlib.sha1(f"{seed}:{key}".encode()).hexdigest()


def split_samples(samples: list[Sample], cfg: SplitConfig | None = None) -> dict[str, list[Sample]]:
    """Split samples into ``{"phase1", "phase3", "val", "test"}``, disjoint by prompt.

    A prompt whose samples carry different categories is stratified under the smallest category name.
    Within a split, samples are ordered by their prompt's hash rank, then by id: the result is the same
    for any permutation of the input (given unique ids).
    """
    cfg = cfg or SplitConfig()
    groups: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        groups[s.prompt_key].append(s)
    strata: dict[str, list[str]] = defaultdict(list)
    for key, members in groups.items():
        strata[min(s.category or "" for s in members)].append(key)

    fractions = list(cfg.fractions().values())
    assigned: dict[str, list[str]] = {name: [] for name in SPLITS}
    for keys in strata.values():
        keys.sort(key=lambda k: hash_order(cfg.seed, k))
        cumulative, start = 0.0, 0
        for name, frac in zip(SPLITS, fractions):
            cumulative += frac
            end = len(keys) if name == SPLITS[-1] else round(cumulative * len(keys))
            assigned[name].extend(keys[start:end])
            start = end
    out: dict[str, list[Sample]] = {}
    for name, keys in assigned.items():
        keys.sort(key=lambda k: hash_order(cfg.seed, k))
        out[name] = [s for k in keys for s in sorted(groups[k], key=lambda s: s.id)]
    return out
