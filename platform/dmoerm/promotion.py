"""Promotion rule: does a candidate reward model beat the incumbent on the same evaluation pairs?

Both models are scored on the same preference pairs; a pair is "correct" when the model ranks the chosen
response above the rejected one. The rule is a paired bootstrap over pairs (the same resampled pair ids for
both models): promote only when the lower bound of the confidence interval of
``accuracy(candidate) - accuracy(incumbent)`` is above zero AND no category got worse than the incumbent by
more than ``category_tolerance`` (point estimate). Pure: no MLflow, no Ray.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from dmoerm.significance import check_same_pairs, paired_bootstrap


class PairOutcome(NamedTuple):
    """How one model did on one evaluation pair. A plain tuple ``("code", True)`` works too."""

    category: str
    """Capability category of the pair (the router's label), e.g. ``"code"``."""
    correct: bool
    """True when the model scored the chosen response above the rejected one."""


PairOutcomes = Mapping[str, PairOutcome]
"""Outcomes of one model keyed by evaluation pair id; both models of a comparison need the same ids."""


@dataclass
class PromotionConfig:
    """When a candidate may replace the incumbent (e.g. the registry's ``champion``)."""

    confidence: float = 0.95
    """Two-sided confidence level of the bootstrap interval of the accuracy difference, in (0, 1)."""
    num_bootstrap: int = 2000
    """Number of paired bootstrap resamples of the evaluation samples (at least 100)."""
    category_tolerance: float = 0.02
    """Largest accepted drop of any category's accuracy versus the incumbent (point estimate), in [0, 1]."""
    seed: int = 0
    """Seed of the resampling: the same outcomes and seed always give the same decision."""

    def __post_init__(self) -> None:
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(
                f"PromotionConfig.confidence must be in (0, 1), e.g. 0.95; got {self.confidence}"
            )
        if isinstance(self.num_bootstrap, bool) or not isinstance(self.num_bootstrap, int):
            raise ValueError(f"PromotionConfig.num_bootstrap must be an int; got {self.num_bootstrap!r}")
        if self.num_bootstrap < 100:
            raise ValueError(
                f"PromotionConfig.num_bootstrap must be >= 100 for a usable interval; "
                f"got {self.num_bootstrap}"
            )
        if not 0.0 <= self.category_tolerance <= 1.0:
            raise ValueError(
                "PromotionConfig.category_tolerance is an accuracy drop in [0, 1], e.g. 0.02; "
                f"got {self.category_tolerance}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"PromotionConfig.seed must be an int; got {self.seed!r}")


@dataclass
class Decision:
    """Outcome of :func:`decide`, recorded on the candidate's registry version."""

    promote: bool
    """True when the candidate may take the alias."""
    reason: str
    """Human sentence with the figures behind the decision."""
    delta: float
    """Point estimate of accuracy(candidate) - accuracy(incumbent) over all pairs."""
    ci_low: float
    """Lower bound of the bootstrap confidence interval of ``delta``."""
    ci_high: float
    """Upper bound of the bootstrap confidence interval of ``delta``."""
    per_category: dict[str, dict] = field(default_factory=dict)
    """Per category: ``num_pairs``, ``candidate_accuracy``, ``incumbent_accuracy``, ``delta``."""


def decide(candidate: PairOutcomes, incumbent: PairOutcomes, cfg: PromotionConfig | None = None) -> Decision:
    """Compare two models' outcomes on the same evaluation pairs and decide whether to promote the candidate.

    Raises ValueError when the pair ids differ, a pair's category differs between the two, or there are
    no pairs.
    """
    cfg = cfg or PromotionConfig()
    pair_ids = _check_same_pairs(candidate, incumbent)
    cand = [bool(candidate[p][1]) for p in pair_ids]
    inc = [bool(incumbent[p][1]) for p in pair_ids]
    num_pairs = len(pair_ids)

    interval = paired_bootstrap(dict(zip(pair_ids, cand)), dict(zip(pair_ids, inc)), confidence=cfg.confidence,
                                num_bootstrap=cfg.num_bootstrap, seed=cfg.seed)
    delta, ci_low, ci_high = interval.delta, interval.low, interval.high
    per_category = _per_category(pair_ids, candidate, cand, inc)

    acc_cand, acc_inc = sum(cand) / num_pairs, sum(inc) / num_pairs
    level = f"{cfg.confidence:.0%}"
    summary = (
        f"candidate accuracy {acc_cand:.3f} vs incumbent {acc_inc:.3f} on {num_pairs} pairs "
        f"of {interval.num_samples} samples "
        f"(delta {delta:+.3f}, {level} CI [{ci_low:+.3f}, {ci_high:+.3f}])"
    )
    worse = {
        cat: stats for cat, stats in per_category.items() if stats["delta"] < -cfg.category_tolerance - 1e-12
    }
    problems = []
    if ci_low <= 0.0:
        problems.append(f"the {level} confidence interval is not above 0")
    for cat, stats in sorted(worse.items(), key=lambda kv: kv[1]["delta"]):
        problems.append(
            f"category '{cat}' dropped from {stats['incumbent_accuracy']:.3f} to "
            f"{stats['candidate_accuracy']:.3f} ({stats['delta']:+.3f}, "
            f"tolerance {cfg.category_tolerance:.3f}, {stats['num_pairs']} pairs)"
        )
    if problems:
        reason = f"Refused: {'; '.join(problems)}. {summary[0].upper()}{summary[1:]}."
    else:
        reason = (
            f"Promoted: {summary}; the interval is above 0 and no category dropped by more than "
            f"{cfg.category_tolerance:.3f}."
        )
    return Decision(
        promote=not problems,
        reason=reason,
        delta=delta,
        ci_low=ci_low,
        ci_high=ci_high,
        per_category=per_category,
    )


def _check_same_pairs(candidate: PairOutcomes, incumbent: PairOutcomes) -> list[str]:
    """Sorted pair ids shared by both, with the same category in both; ValueError naming the mismatch."""
    pair_ids = check_same_pairs(candidate, incumbent)
    mismatched = [p for p in pair_ids if candidate[p][0] != incumbent[p][0]]
    if mismatched:
        p = mismatched[0]
        raise ValueError(
            f"{len(mismatched)} pair(s) have different categories in the two outcome sets, e.g. pair {p!r}: "
            f"{candidate[p][0]!r} (candidate) vs {incumbent[p][0]!r} (incumbent); "
            "both must come from the same labeled evaluation set."
        )
    return pair_ids


def _per_category(
    pair_ids: list[str], candidate: PairOutcomes, cand: list[bool], inc: list[bool]
) -> dict[str, dict]:
    counts: dict[str, list[int]] = {}  # category -> [num_pairs, candidate correct, incumbent correct]
    for pair_id, c, i in zip(pair_ids, cand, inc):
        row = counts.setdefault(str(candidate[pair_id][0]), [0, 0, 0])
        row[0] += 1
        row[1] += int(c)
        row[2] += int(i)
    out = {}
    for cat in sorted(counts):
        n, c, i = counts[cat]
        out[cat] = {
            "num_pairs": n,
            "candidate_accuracy": c / n,
            "incumbent_accuracy": i / n,
            "delta": (c - i) / n,
        }
    return out
