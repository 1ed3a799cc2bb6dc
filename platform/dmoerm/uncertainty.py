"""The uncertainty-penalised DMoERM reward: what no ensemble offers for free.

A DMoERM category's K capability experts each score a response. Where they agree the aggregator's reward
is better supported than where they pull apart, so the penalised reward is

    reward - weight * spread,   spread = std over the routed category's experts of (score_k - mean_k) / std_k

with ``mean_k, std_k`` each expert's score statistics on TRAINING rows (the phase-3 split: never test rows),
computed at training time and stored in the bundle (``bundle.json`` ``capability_stats``). Standardising
puts experts with different score scales on one scale; std is the population std (a category with one
expert has spread 0: the penalty needs at least two experts). An expert whose training scores never varied
(std 0) contributes a standardised score of 0.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

from dmoerm.data.records import Sample
from dmoerm.modeling.reward_model import RewardModel, Score

logger = logging.getLogger(__name__)
CapabilityStats = dict[str, dict[str, tuple[float, float]]]
"""{category: {capability: (mean, std)}} of the experts' scores on training rows."""
META_KEY = "capability_stats"


def capability_stats(model: RewardModel, samples: Sequence[Sample], use_known_category: bool = True
                     ) -> CapabilityStats:
    """Each category's per-expert score mean and (population) std over the rows of ``samples`` scored by
    that category (a sample's known category when ``use_known_category`` and it has one, else the routed
    one). Pass training rows (the phase-3 split), never test rows. Categories without rows are absent."""
    scored = model.score_samples(samples, use_known_category=use_known_category)
    values: dict[str, dict[str, list[float]]] = {}
    for row in scored:
        for s in row:
            for cap, v in s.capability_scores.items():
                values.setdefault(s.category, {}).setdefault(cap, []).append(v)
    out: CapabilityStats = {}
    for cat in model.categories:  # the model's order
        if cat not in values:
            logger.warning("capability stats: no row scored by category %r among %d samples", cat, len(samples))
            continue
        out[cat] = {}
        for cap, vs in values[cat].items():
            mean = sum(vs) / len(vs)
            out[cat][cap] = (mean, math.sqrt(sum((v - mean) ** 2 for v in vs) / len(vs)))
    return out


def _stats_for(stats: CapabilityStats, score: Score) -> dict[str, tuple[float, float]]:
    if score.category not in stats:
        raise ValueError(f"no capability statistics for category {score.category!r} (statistics cover "
                         f"{sorted(stats)}): compute them with capability_stats on training rows of every category")
    mine = stats[score.category]
    missing = sorted(set(score.capability_scores) - set(mine))
    if missing:
        raise ValueError(f"capability statistics of category {score.category!r} lack experts {missing}")
    return mine


def standardised(score: Score, stats: CapabilityStats) -> dict[str, float]:
    """The score's expert scores as ``(score - mean) / std`` of its category's training statistics."""
    mine = _stats_for(stats, score)
    return {cap: (v - mine[cap][0]) / mine[cap][1] if mine[cap][1] > 0 else 0.0
            for cap, v in score.capability_scores.items()}


def expert_spread(scores: Sequence[Sequence[Score]], stats: CapabilityStats) -> list[list[float]]:
    """Per response: the population std across its routed category's experts of their standardised scores."""
    out = []
    for row in scores:
        spreads = []
        for s in row:
            z = list(standardised(s, stats).values())
            mean = sum(z) / len(z) if z else 0.0
            spreads.append(math.sqrt(sum((v - mean) ** 2 for v in z) / len(z)) if z else 0.0)
        out.append(spreads)
    return out


def penalised_rewards(scores: Sequence[Sequence[Score]], stats: CapabilityStats, weight: float
                      ) -> list[list[float]]:
    """Per response: the aggregator reward minus ``weight`` times the experts' spread."""
    if weight < 0:
        raise ValueError(f"the uncertainty weight must be >= 0, got {weight}")
    return [[s.reward - weight * d for s, d in zip(row, spread)]
            for row, spread in zip(scores, expert_spread(scores, stats))]


# ---- in the bundle ---------------------------------------------------------------------------------
def stats_to_meta(stats: CapabilityStats) -> dict[str, Any]:
    """JSON form for ``bundle.json``: {category: {capability: {"mean", "std"}}}."""
    return {c: {cap: {"mean": m, "std": s} for cap, (m, s) in caps.items()} for c, caps in stats.items()}


def stats_from_meta(meta: dict[str, Any]) -> CapabilityStats | None:
    """A bundle's stored statistics (``bundle.json`` ``capability_stats``), or None when it has none."""
    raw = meta.get(META_KEY)
    if raw is None:
        return None
    return {c: {cap: (float(v["mean"]), float(v["std"])) for cap, v in caps.items()} for c, caps in raw.items()}


def bundle_capability_stats(meta: dict[str, Any], model: RewardModel,
                            samples: Sequence[Sample] | None = None) -> CapabilityStats:
    """The statistics stored with a bundle; for a bundle written without them, computed from ``samples``
    (pass training rows) with a warning; ValueError when it has none and no samples are given."""
    stats = stats_from_meta(meta)
    if stats is not None:
        return stats
    if not samples:
        raise ValueError("this bundle has no capability_stats in bundle.json (trained before they were stored): "
                         "pass training samples to compute them")
    logger.warning("bundle has no capability_stats: computing them from %d given samples", len(samples))
    return capability_stats(model, samples)


class PenalisedRewardModel:
    """A scorer of the uncertainty-penalised DMoERM reward (e.g. one more curve of the best-of-N study)."""

    def __init__(self, model: RewardModel, stats: CapabilityStats, weight: float = 1.0) -> None:
        self.model, self.stats, self.weight = model, stats, weight

    def score_samples(self, samples: Sequence[Sample], use_known_category: bool = False) -> list[list[float]]:
        return penalised_rewards(self.model.score_samples(samples, use_known_category), self.stats, self.weight)
