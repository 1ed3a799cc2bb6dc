"""Evaluation: pairwise accuracy against held-out human ranks per category and overall (ties excluded),
router accuracy and confusion matrix, DMoERM and the single-RM baseline side by side.

A pair counts as correct when the better-ranked response (smaller rank) gets the strictly larger reward.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from dmoerm.data.records import Sample
from dmoerm.promotion import PairOutcome


def pair_id(sample: Sample, better: int, worse: int) -> str:
    return f"{sample.id}#{better}>{worse}"


def pair_outcomes(samples: Sequence[Sample], rewards: Sequence[Sequence[float]]) -> dict[str, PairOutcome]:
    """Per evaluation pair: its category (the sample's true one) and whether the model ranked it right."""
    if len(samples) != len(rewards):
        raise ValueError(f"{len(samples)} samples but {len(rewards)} reward lists")
    out: dict[str, PairOutcome] = {}
    for s, r in zip(samples, rewards):
        if len(r) != len(s.responses):
            raise ValueError(f"sample {s.id}: {len(r)} rewards for {len(s.responses)} responses")
        for b, w in s.pairs():
            out[pair_id(s, b, w)] = PairOutcome(s.category or "uncategorised", bool(r[b] > r[w]))
    return out


def accuracy_by_category(outcomes: dict[str, PairOutcome]) -> dict[str, dict[str, float]]:
    """{category: {"accuracy", "pairs"}} plus an ``"overall"`` entry."""
    hits: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for o in outcomes.values():
        for key in (o.category, "overall"):
            hits[key][0] += int(o.correct)
            hits[key][1] += 1
    return {k: {"accuracy": c / n if n else float("nan"), "pairs": n}
            for k, (c, n) in sorted(hits.items(), key=lambda kv: (kv[0] == "overall", kv[0]))}


def confusion_matrix(true: Sequence[str], pred: Sequence[str], categories: Sequence[str]) -> list[list[int]]:
    """rows = true category, columns = routed category."""
    idx = {c: i for i, c in enumerate(categories)}
    m = [[0] * len(categories) for _ in categories]
    for t, p in zip(true, pred):
        if t in idx:
            m[idx[t]][idx[p]] += 1
    return m


@dataclass
class EvalReport:
    dmoerm: dict[str, dict[str, float]]
    baseline: dict[str, dict[str, float]] | None
    router_accuracy: float
    confusion: list[list[int]]
    categories: list[str]
    outcomes: dict[str, PairOutcome] = field(default_factory=dict, repr=False)
    baseline_outcomes: dict[str, PairOutcome] | None = field(default=None, repr=False)

    def metrics(self) -> dict[str, float]:
        """Flat metric names for MLflow: ``dmoerm/acc/<category>``, ``baseline/acc/...``, router."""
        m = {f"dmoerm/acc/{k}": v["accuracy"] for k, v in self.dmoerm.items()}
        if self.baseline:
            m.update({f"baseline/acc/{k}": v["accuracy"] for k, v in self.baseline.items()})
        m["router/accuracy"] = self.router_accuracy
        return m

    def table(self) -> str:
        rows = [("category", "pairs", "DMoERM", "single RM", "delta")]
        for k, v in self.dmoerm.items():
            b = self.baseline.get(k, {}).get("accuracy") if self.baseline else None
            rows.append((k, str(v["pairs"]), f"{v['accuracy']:.3f}", "-" if b is None else f"{b:.3f}",
                         "-" if b is None else f"{v['accuracy'] - b:+.3f}"))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                 for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        lines.append(f"router accuracy: {self.router_accuracy:.3f} (rows true, columns routed: "
                     f"{self.categories}) {self.confusion}")
        return "\n".join(lines)


def evaluate(model, samples: Sequence[Sample], baseline=None) -> EvalReport:
    """Score ``samples`` through the real routed scoring path (and the baseline) and compare to human ranks.

    ``model`` is a ``RewardModel``; ``baseline`` an optional ``SingleRewardModel``.
    """
    scored = model.score_samples(samples)
    rewards = [[s.reward for s in row] for row in scored]
    outcomes = pair_outcomes(samples, rewards)
    base_outcomes = None
    if baseline is not None:
        base_outcomes = pair_outcomes(samples, baseline.score_samples(samples))
    known = [(s.category, row[0].category) for s, row in zip(samples, scored) if s.category is not None]
    cats = list(model.categories)
    router_acc = sum(t == p for t, p in known) / len(known) if known else float("nan")
    return EvalReport(
        dmoerm=accuracy_by_category(outcomes),
        baseline=accuracy_by_category(base_outcomes) if base_outcomes is not None else None,
        router_accuracy=router_acc,
        confusion=confusion_matrix([t for t, _ in known], [p for _, p in known], cats),
        categories=cats, outcomes=outcomes, baseline_outcomes=base_outcomes)
