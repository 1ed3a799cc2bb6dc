"""Evaluation: pairwise accuracy against held-out human ranks per category and overall (ties excluded),
router accuracy and confusion matrix, DMoERM and the single-RM baseline side by side, with the
paired-bootstrap interval of their difference (``dmoerm.significance``, the helper promotion uses).

A pair counts as correct when the better-ranked response (smaller rank) gets the strictly larger reward.
A pair whose two rows are the same model input after truncation (``Score.input_digest``) cannot be ranked
by any model: it is reported apart and not scored. How much truncation cut is reported too.

The samples' categories are router classes only when every labelled sample's category is one of the
model's categories; otherwise they are the user's reporting subsets: accuracy per subset, no router
figures.
"""

from __future__ import annotations

import logging
import statistics
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from dmoerm.data.records import Sample
from dmoerm.names import metric_name
from dmoerm.promotion import PairOutcome

if TYPE_CHECKING:
    from dmoerm.modeling.reward_model import Score
    from dmoerm.significance import Interval

logger = logging.getLogger(__name__)


def pair_id(sample: Sample, better: int, worse: int) -> str:
    return f"{sample.id}#{better}>{worse}"


def check_evaluable(samples: Sequence[Sample]) -> int:
    """The number of evaluation pairs; ValueError when there is none (every sample's ranks tied) or when
    two samples share an id (their pairs would merge). Needs no model: run it before loading one."""
    counts = Counter(s.id for s in samples)
    dupes = sorted(k for k, n in counts.items() if n > 1)
    if dupes:
        shown = ", ".join(f"{d!r} ({counts[d]}x)" for d in dupes[:5])
        raise ValueError(f"{len(dupes)} sample id(s) appear more than once: {shown}{', ...' if len(dupes) > 5 else ''}"
                         "; their pairs would be merged. Give every sample a unique id")
    num_pairs = sum(len(s.pairs()) for s in samples)
    if not num_pairs:
        raise ValueError(f"no pairs to evaluate: {len(samples)} sample(s), and in every one all responses "
                         "have the same rank (a pair needs two responses with different ranks)")
    return num_pairs


def identical_pairs(samples: Sequence[Sample], scored: Sequence[Sequence[Score]]) -> list[str]:
    """Pair ids whose two rows are the same model input after truncation (equal kept token ids)."""
    out = []
    for s, row in zip(samples, scored):
        for b, w in s.pairs():
            if row[b].input_digest and row[b].input_digest == row[w].input_digest:
                out.append(pair_id(s, b, w))
    return out


def pair_outcomes(samples: Sequence[Sample], rewards: Sequence[Sequence[float]],
                  exclude: Sequence[str] = ()) -> dict[str, PairOutcome]:
    """Per evaluation pair (but those in ``exclude``): its category (the sample's true one) and whether the
    model ranked it right."""
    if len(samples) != len(rewards):
        raise ValueError(f"{len(samples)} samples but {len(rewards)} reward lists")
    skip = set(exclude)
    out: dict[str, PairOutcome] = {}
    for s, r in zip(samples, rewards):
        if len(r) != len(s.responses):
            raise ValueError(f"sample {s.id}: {len(r)} rewards for {len(s.responses)} responses")
        for b, w in s.pairs():
            key = pair_id(s, b, w)
            if key in out:
                raise ValueError(f"pair {key!r} appears twice: sample id {s.id!r} is not unique")
            if key not in skip:
                out[key] = PairOutcome(s.category or "uncategorised", bool(r[b] > r[w]))
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
class TruncationStats:
    """What fitting the rows into ``max_length`` cut (one row = one (context, response) input)."""

    rows: int
    truncated_rows: int
    """Rows that lost any token (context or response)."""
    context_truncated_rows: int
    response_truncated_rows: int
    context_tokens_dropped: int
    response_tokens_dropped: int
    median_response_kept: float
    """Median fraction of a cut response the model saw (1.0 when no response was cut)."""
    max_length: int | None = None

    @classmethod
    def of(cls, scores: Sequence[Score], max_length: int | None = None) -> TruncationStats:
        cut = [s for s in scores if s.response_tokens_dropped > 0]
        kept = [s.response_tokens / (s.response_tokens + s.response_tokens_dropped) for s in cut]
        return cls(len(scores), sum(s.context_tokens_dropped > 0 or s.response_tokens_dropped > 0 for s in scores),
                   sum(s.context_tokens_dropped > 0 for s in scores), len(cut),
                   sum(s.context_tokens_dropped for s in scores), sum(s.response_tokens_dropped for s in scores),
                   statistics.median(kept) if kept else 1.0, max_length)

    @property
    def fraction(self) -> float:
        return self.truncated_rows / self.rows if self.rows else 0.0

    def line(self) -> str:
        at = f" at max_length {self.max_length}" if self.max_length else ""
        if not self.truncated_rows:
            return f"truncation: none of {self.rows} rows cut{at}"
        parts = []
        if self.response_truncated_rows:
            parts.append(f"{self.response_truncated_rows} responses (median {self.median_response_kept:.0%} of a "
                         f"cut response kept, {self.response_tokens_dropped} tokens dropped from their end)")
        if self.context_truncated_rows:
            parts.append(f"{self.context_truncated_rows} contexts ({self.context_tokens_dropped} tokens dropped "
                         "from their start)")
        return (f"truncation: {self.truncated_rows} of {self.rows} rows ({self.fraction:.0%}) cut{at}: "
                + ", ".join(parts))


@dataclass
class EvalReport:
    dmoerm: dict[str, dict[str, float]]
    baseline: dict[str, dict[str, float]] | None
    router_accuracy: float | None
    """None when the samples' categories are not the model's router categories (or none is known)."""
    confusion: list[list[int]] | None
    categories: list[str]
    outcomes: dict[str, PairOutcome] = field(default_factory=dict, repr=False)
    baseline_outcomes: dict[str, PairOutcome] | None = field(default=None, repr=False)
    interval: Interval | None = None
    """accuracy(DMoERM) - accuracy(single RM) on the same pairs, paired bootstrap over samples."""
    truncation: TruncationStats | None = None
    identical_pairs: list[str] = field(default_factory=list)
    """Pairs whose rows were the same input after truncation: reported, not scored."""
    grouping: str = "category"
    """``category`` (router classes) or ``subset`` (the data's own labels, not this model's categories)."""
    notes: list[str] = field(default_factory=list)
    """Lines printed at the end of the table (warnings, data budgets, tuning)."""

    def metrics(self) -> dict[str, float]:
        """Flat metric names for MLflow: ``dmoerm/acc/<category>``, ``baseline/acc/...``, router,
        ``delta/...`` (the interval), ``truncation/...``, ``eval/identical_pairs``."""
        m = {f"dmoerm/acc/{metric_name(k)}": v["accuracy"] for k, v in self.dmoerm.items()}  # MLflow-safe keys
        if self.baseline:
            m.update({f"baseline/acc/{metric_name(k)}": v["accuracy"] for k, v in self.baseline.items()})
        if self.router_accuracy is not None:
            m["router/accuracy"] = self.router_accuracy
        if self.interval is not None:
            m.update({"delta/overall": self.interval.delta, "delta/ci_low": self.interval.low,
                      "delta/ci_high": self.interval.high})
        if self.truncation is not None:
            t = self.truncation
            m.update({"truncation/rows_truncated_fraction": t.fraction,
                      "truncation/responses_truncated": float(t.response_truncated_rows),
                      "truncation/median_response_kept": t.median_response_kept})
        m["eval/identical_pairs"] = float(len(self.identical_pairs))
        return m

    def paired_counts(self) -> dict[str, int] | None:
        """Per-pair agreement of the two models: both right, only DMoERM, only the single RM, both wrong."""
        if self.baseline_outcomes is None:
            return None
        c = Counter((o.correct, self.baseline_outcomes[k].correct) for k, o in self.outcomes.items())
        return {"both_right": c[True, True], "dmoerm_only": c[True, False], "baseline_only": c[False, True],
                "both_wrong": c[False, False]}

    def table(self) -> str:
        rows = [(self.grouping, "pairs", "DMoERM", "single RM", "delta")]
        for k, v in self.dmoerm.items():
            b = self.baseline.get(k, {}).get("accuracy") if self.baseline else None
            rows.append((k, str(v["pairs"]), f"{v['accuracy']:.3f}", "-" if b is None else f"{b:.3f}",
                         "-" if b is None else f"{v['accuracy'] - b:+.3f}"))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                 for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        if self.interval is not None:
            lines.append(f"DMoERM - single RM: {self.interval}")
        counts = self.paired_counts()
        if counts is not None:
            lines.append("per pair: both right {both_right}, DMoERM only {dmoerm_only}, single RM only "
                         "{baseline_only}, both wrong {both_wrong}".format(**counts))
        if self.router_accuracy is not None:
            lines.append(f"router accuracy: {self.router_accuracy:.3f} (rows true, columns routed: "
                         f"{self.categories}) {self.confusion}")
        elif self.grouping == "subset":
            lines.append(f"subsets: the data's own labels, not this model's categories {self.categories} "
                         "(routing not assessed)")
        if self.truncation is not None:
            lines.append(self.truncation.line())
        if self.identical_pairs:
            lines.append(f"identical after truncation: {len(self.identical_pairs)} pair(s) not scored (both "
                         f"responses are the same input once cut), e.g. {self.identical_pairs[:3]}")
        return "\n".join(lines + list(self.notes))

    def to_dict(self) -> dict[str, Any]:
        """Everything as JSON-ready data, per-pair outcomes of both models included."""
        base = self.baseline_outcomes
        return {"metrics": self.metrics(), "dmoerm": self.dmoerm, "baseline": self.baseline,
                "grouping": self.grouping, "router_accuracy": self.router_accuracy, "confusion": self.confusion,
                "categories": self.categories,
                "interval": asdict(self.interval) if self.interval is not None else None,
                "paired_counts": self.paired_counts(),
                "truncation": asdict(self.truncation) if self.truncation is not None else None,
                "identical_after_truncation": self.identical_pairs, "notes": self.notes,
                "pairs": {k: {"category": o.category, "dmoerm": o.correct,
                              "baseline": base[k].correct if base is not None else None}
                          for k, o in self.outcomes.items()}}


def _router_figures(model, samples: Sequence[Sample], scored: Sequence[Sequence[Score]]
                    ) -> tuple[float | None, list[list[int]] | None, str]:
    """Router accuracy and confusion when the samples are labelled with the model's categories."""
    cats = list(model.categories)
    known = [(s.category, row[0].category) for s, row in zip(samples, scored) if s.category is not None]
    if not known:
        return None, None, "category"
    if any(t not in model.categories for t, _ in known):
        return None, None, "subset"
    acc = sum(t == p for t, p in known) / len(known)
    return acc, confusion_matrix([t for t, _ in known], [p for _, p in known], cats), "category"


def evaluate(model, samples: Sequence[Sample], baseline=None, *, truncation_warning: float = 0.1,
             confidence: float = 0.95, num_bootstrap: int = 2000, seed: int = 0) -> EvalReport:
    """Score ``samples`` through the real routed scoring path (and the baseline, on the same trunk pass)
    and compare to human ranks.

    ``model`` is a ``RewardModel``; ``baseline`` an optional ``SingleRewardModel``. Warns (and notes in the
    report) when more than ``truncation_warning`` of the rows were cut. Raises ValueError when there is no
    pair to score (all ranks tied, or every pair identical after truncation) or sample ids repeat.
    """
    from dmoerm.modeling.reward_model import RewardModel, SingleRewardModel, score_with_baseline
    from dmoerm.significance import paired_bootstrap

    check_evaluable(samples)
    base_rewards = None
    if isinstance(model, RewardModel) and isinstance(baseline, SingleRewardModel):
        scored, base_rewards = score_with_baseline(model, baseline, samples)
    else:
        scored = model.score_samples(samples)
        if baseline is not None:
            base_rewards = baseline.score_samples(samples)
    identical = identical_pairs(samples, scored)
    outcomes = pair_outcomes(samples, [[s.reward for s in row] for row in scored], exclude=identical)
    if not outcomes:
        raise ValueError(f"no pairs to evaluate: all {len(identical)} pairs are identical inputs after "
                         "truncation at the model's max_length (the responses differ only past the cut)")
    base_outcomes = pair_outcomes(samples, base_rewards, exclude=identical) if base_rewards is not None else None
    backbone = getattr(model, "backbone", None)
    trunc = TruncationStats.of([s for row in scored for s in row], getattr(backbone, "max_length", None))
    notes = []
    if trunc.fraction > truncation_warning:
        warning = (f"{trunc.fraction:.0%} of the rows were truncated (above {truncation_warning:.0%}): the "
                   "model saw only part of them; a larger model.max_length shows it more")
        notes.append(f"WARNING: {warning}")
        logger.warning("%s", warning)
    if identical:
        logger.warning("%d pair(s) are identical inputs after truncation and were not scored", len(identical))
    interval = None
    if base_outcomes is not None:
        interval = paired_bootstrap({k: o.correct for k, o in outcomes.items()},
                                    {k: o.correct for k, o in base_outcomes.items()}, confidence=confidence,
                                    num_bootstrap=num_bootstrap, seed=seed)
    router_acc, confusion, grouping = _router_figures(model, samples, scored)
    return EvalReport(
        dmoerm=accuracy_by_category(outcomes),
        baseline=accuracy_by_category(base_outcomes) if base_outcomes is not None else None,
        router_accuracy=router_acc, confusion=confusion, categories=list(model.categories), outcomes=outcomes,
        baseline_outcomes=base_outcomes, interval=interval, truncation=trunc, identical_pairs=identical,
        grouping=grouping, notes=notes)
