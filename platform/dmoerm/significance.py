"""How sure is a difference in pairwise accuracy? One paired bootstrap, shared by promotion, ``dmoerm
evaluate`` and the studies.

Two reward models are scored on the same preference pairs; a pair's outcome is 1 when the model ranked the
better response above the worse one. A sample with R ranked responses gives up to R(R-1)/2 pairs that share
a conversation and responses, so its pairs are not independent: the bootstrap resamples *samples* (clusters
of pairs, the same resampled samples for both models) and recomputes the pooled accuracy difference
``sum(diffs of the drawn samples) / sum(pairs of the drawn samples)``. With one pair per sample this is the
ordinary paired bootstrap over pairs. Pure: torch only for the resampling.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

_CHUNK = 256  # resamples drawn per batch: bounds memory to _CHUNK * num_samples indices


def sample_of(pair_id: str) -> str:
    """The sample a pair belongs to: pair ids are ``<sample id>#<better>><worse>`` (``evaluation.pair_id``);
    an id without ``#`` is its own sample."""
    return pair_id.rsplit("#", 1)[0]


@dataclass(frozen=True)
class Interval:
    """accuracy(candidate) - accuracy(incumbent) on the same pairs, with its bootstrap interval."""

    delta: float
    """Point estimate over all pairs."""
    low: float
    """Lower bound of the two-sided ``confidence`` percentile interval."""
    high: float
    """Upper bound."""
    confidence: float
    num_pairs: int
    num_samples: int
    """Clusters resampled (distinct samples behind the pairs)."""

    def __str__(self) -> str:
        return (f"{self.delta:+.3f} ({self.confidence:.0%} CI [{self.low:+.3f}, {self.high:+.3f}], "
                f"{self.num_pairs} pairs of {self.num_samples} samples)")


def check_same_pairs(candidate: Mapping[str, object], incumbent: Mapping[str, object]) -> list[str]:
    """The sorted pair ids both share; ValueError naming the mismatch otherwise."""
    cand_ids, inc_ids = set(candidate), set(incumbent)
    if cand_ids != inc_ids:
        only_cand, only_inc = sorted(cand_ids - inc_ids), sorted(inc_ids - cand_ids)
        raise ValueError(
            "the two models must be evaluated on the same pairs: "
            f"{len(only_cand)} pair id(s) only in the candidate {_preview(only_cand)}, "
            f"{len(only_inc)} only in the incumbent {_preview(only_inc)}. "
            "Evaluate both models on one evaluation set."
        )
    if not cand_ids:
        raise ValueError("no evaluation pairs: both outcome mappings are empty")
    return sorted(cand_ids)  # fixed order: the result must not depend on dict insertion order


def paired_bootstrap(candidate: Mapping[str, bool], incumbent: Mapping[str, bool], *, confidence: float = 0.95,
                     num_bootstrap: int = 2000, seed: int = 0) -> Interval:
    """The accuracy difference of two models on the same pair ids (pair id -> correct), resampling samples."""
    import torch  # the only tensor code here; keep importing this module cheap

    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), e.g. 0.95; got {confidence}")
    if num_bootstrap < 1:
        raise ValueError(f"num_bootstrap must be >= 1; got {num_bootstrap}")
    ids = check_same_pairs(candidate, incumbent)
    clusters: dict[str, list[float]] = {}  # sample -> [sum of diffs, pairs]
    for p in ids:
        c = clusters.setdefault(sample_of(p), [0.0, 0.0])
        c[0] += int(bool(candidate[p])) - int(bool(incumbent[p]))
        c[1] += 1
    sums = torch.tensor([c[0] for c in clusters.values()], dtype=torch.float64)  # (S,)
    sizes = torch.tensor([c[1] for c in clusters.values()], dtype=torch.float64)  # (S,)
    num = sums.numel()
    gen = torch.Generator().manual_seed(seed)
    boot = []
    for start in range(0, num_bootstrap, _CHUNK):
        idx = torch.randint(num, (min(_CHUNK, num_bootstrap - start), num), generator=gen)  # (B, S)
        boot.append(sums[idx].sum(dim=1) / sizes[idx].sum(dim=1))  # (B,)
    alpha = 1.0 - confidence
    q = torch.tensor([alpha / 2, 1 - alpha / 2], dtype=torch.float64)
    low, high = torch.quantile(torch.cat(boot), q).tolist()
    return Interval(_clean(float(sums.sum() / sizes.sum())), _clean(low), _clean(high), confidence, len(ids), num)


def _preview(ids: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(i) for i in ids[:limit])
    return f"[{shown}{', ...' if len(ids) > limit else ''}]"


def _clean(x: float) -> float:
    """Round away float noise (e.g. 1e-17 for a tie) so "above 0" means a real difference."""
    return 0.0 if math.isclose(x, 0.0, abs_tol=1e-12) else round(x, 12)
