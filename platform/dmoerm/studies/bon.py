"""The best-of-N study: per prompt, each reward model picks the candidate it scores highest out of N; the
picked response's gold score, for N in powers of two, against the analytic KL of best-of-N.

Ray-free: the job (``jobs/study_bon.py``) scores the candidates (one Ray task per reward model, through the
batched scorer) and calls :func:`bon_curves` on the scores. Every number here comes from three arrays per
reward model: the candidates' proxy rewards, their gold scores, and the prompts they belong to.

Estimator. With K candidates per prompt, best-of-n (n <= K) is estimated without sampling: over a uniformly
random n-subset of the K candidates, the candidate with the j-th smallest proxy (j = 0..K-1) is the subset's
maximum with probability C(j, n-1) / C(K, n); the expected gold (and proxy) of the pick is the weighted sum.
Candidates tied on proxy share their mass (random tie-break): each gets the tie group's mean gold. n=1 is a
random candidate; n=K is the argmax over all K.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from dmoerm.data.records import Sample, Turn
from dmoerm.generation import GenerationConfig

logger = logging.getLogger(__name__)
Scorer = Callable[[Sequence[Sample]], list[list[float]]]
"""Samples (one per prompt, the candidates as its responses) -> one reward per candidate, batched."""
ORACLE = "gold oracle"
"""The reference curve: best-of-n picked by the gold score itself (the best any reward model can do)."""


# ---- configuration -------------------------------------------------------------------------------------
@dataclass
class AlpacaBonSource:
    """reward-bench's ``bon_eval``: AlpacaEval prompts x sampled responses, each judged against a reference."""

    path: str = "../../shared/data/alpaca-bon"
    """The folder holding ``bon_eval/`` (relative paths: to the config file's folder)."""
    max_prompts: int | None = None
    """The first prompts (in the files' order) only; None: all 805."""
    samples: list[int] | None = None
    """Which sampled responses (the ``<generator>.<i>`` folders) are the candidates; None: every one present."""
    generator: str = "tulu-2-dpo-13b"
    reference: str = "GPT35t"
    annotator: str = "weighted_alpaca_eval_gpt4_turbo"


@dataclass
class GeneratedSource:
    """Candidates sampled from a policy model (``dmoerm.generation``), gold from another bundle."""

    prompts: str
    """JSON lines with ``prompt`` or ``context`` and an optional ``id`` (relative: to the config's folder)."""
    generation: GenerationConfig
    gold_bundle: str
    """The gold scorer: a bundle (``models:/NAME@alias``, folder, ``s3://``) whose DMoERM reward is gold."""
    num_workers: int = 1
    gpus_per_worker: float = 0.0


@dataclass
class CandidatesConfig:
    source: Literal["alpaca-bon", "generate"] = "alpaca-bon"
    alpaca_bon: AlpacaBonSource = field(default_factory=AlpacaBonSource)
    generate: GeneratedSource | None = None


@dataclass
class ScorerSpec:
    """One reward model of the comparison, by ``kind`` (:data:`SCORER_KINDS`): ``dmoerm`` (the bundle's
    model), ``baseline`` (its single RM), ``dmoerm-uncertainty`` (the DMoERM reward minus ``weight`` times
    its experts' spread, ``dmoerm.uncertainty``; needs the bundle's ``capability_stats``), ``ensemble-mean``,
    ``ensemble-min``, ``ensemble-uncertainty`` (an RM ensemble, ``dmoerm.ensemble``, on the bundle's base)."""

    name: str
    kind: str = "dmoerm"
    bundle: str | None = None
    """None: the study's ``bundle``."""
    weight: float | None = None
    """The uncertainty weight of ``dmoerm-uncertainty`` (None: 1.0) and ``ensemble-uncertainty`` (None: the
    ensemble's own)."""
    ensemble: str | None = None
    """The ensemble folder of ``ensemble-*`` kinds (None: ``<bundle>/ensemble``; relative: to the config's folder)."""


@dataclass
class BonStudyConfig:
    bundle: str
    """The reward model under study: ``models:/NAME@alias``, ``models:/NAME/VERSION``, a folder or s3://."""
    candidates: CandidatesConfig = field(default_factory=CandidatesConfig)
    scorers: list[ScorerSpec] = field(default_factory=lambda: [ScorerSpec("DMoERM", "dmoerm"),
                                                               ScorerSpec("single RM", "baseline")])
    ns: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    """Best-of-n for these n: powers of two, at most the candidates per prompt."""
    num_bootstrap: int = 1000
    """Bootstrap resamples of the prompts for the confidence bands."""
    confidence: float = 0.95
    seed: int = 0
    batch_size: int = 32
    """Rows per scoring batch."""
    storage_uri: str = ".scratch/studies"
    """Finished scoring is kept here (relative: to the working directory); a re-run reuses it."""
    tracking_uri: str | None = None
    """MLflow; None: ``MLFLOW_TRACKING_URI``, else a SQLite file beside the storage."""
    registry_uri: str | None = None
    """Where ``models:/`` URIs resolve; None: the tracking URI."""
    experiment: str = "dmoerm-studies"
    name: str = "bon"

    def __post_init__(self) -> None:
        bad = [n for n in self.ns if n < 1 or n & (n - 1)]
        if not self.ns or bad:
            raise ValueError(f"ns: best-of-n needs powers of two (1, 2, 4, ...), got {self.ns}")
        self.ns = sorted(set(self.ns))
        if self.num_bootstrap < 1:
            raise ValueError(f"num_bootstrap must be >= 1, got {self.num_bootstrap}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")
        names = [s.name for s in self.scorers]
        if not names or len(set(names)) != len(names) or ORACLE in names:
            raise ValueError(f"scorers: need distinct names (not {ORACLE!r}), got {names}")
        for i, s in enumerate(self.scorers):
            if s.kind not in SCORER_KINDS:
                raise ValueError(f"scorers[{i}].kind: {s.kind!r} is not one of {sorted(SCORER_KINDS)}")
        if self.candidates.source == "generate" and self.candidates.generate is None:
            raise ValueError("candidates.source is 'generate' but candidates.generate is not set")


def _resolve(p: str, base: Path) -> str:
    if "://" in p or p.startswith("models:/") or Path(p).is_absolute():
        return p
    return str((base / p).resolve())


def load_bon_config(path: str | Path | None = None, overrides: list[str] | None = None,
                    data: dict | None = None) -> BonStudyConfig:
    """YAML (or a dict) + dotted overrides -> a checked config. Inputs (bundle folders, the data, prompts)
    resolve relative to the config file's folder; ``storage_uri`` and SQLite URIs to the working directory."""
    from dmoerm.configtools import apply_overrides, from_dict, load_yaml

    raw = apply_overrides(dict(load_yaml(path) if path is not None else data or {}), overrides or [])
    cfg = from_dict(BonStudyConfig, raw)
    base = Path(path).resolve().parent if path is not None else Path.cwd()
    cfg.bundle = _resolve(cfg.bundle, base)
    cfg.candidates.alpaca_bon.path = _resolve(cfg.candidates.alpaca_bon.path, base)
    for s in cfg.scorers:
        s.bundle = _resolve(s.bundle, base) if s.bundle else None
        s.ensemble = _resolve(s.ensemble, base) if s.ensemble else None
    gen = cfg.candidates.generate
    if gen is not None:
        gen.prompts, gen.gold_bundle = _resolve(gen.prompts, base), _resolve(gen.gold_bundle, base)
    cfg.storage_uri = _resolve(cfg.storage_uri, Path.cwd())
    cfg.tracking_uri, cfg.registry_uri = _absolute_sqlite(cfg.tracking_uri), _absolute_sqlite(cfg.registry_uri)
    return cfg


def _absolute_sqlite(uri: str | None) -> str | None:
    """``sqlite:///rel/path.db`` -> an absolute file (Ray workers run in their own working directories)."""
    if uri is None or not uri.startswith("sqlite:///") or uri.startswith("sqlite:////"):
        return uri
    return f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"


# ---- candidates ----------------------------------------------------------------------------------------
@dataclass
class Candidates:
    """K candidate responses per prompt and, when known, their gold scores (higher is better)."""

    ids: list[str]
    contexts: list[list[Turn]]
    responses: list[list[str]]
    gold: list[list[float]] | None = None
    source: str = ""

    def samples(self) -> list[Sample]:
        """One Sample per prompt whose responses are its candidates (ranks are all ties: unused)."""
        return [Sample(id=i, context=c, responses=list(r), ranks=[1] * len(r), source=self.source)
                for i, c, r in zip(self.ids, self.contexts, self.responses)]

    def digest(self) -> str:
        """Identity of what a scorer reads (prompts and candidates, not the gold)."""
        from dmoerm.stages.store import stable_hash

        return stable_hash({"ids": self.ids, "contexts": [[(t.role, t.content) for t in c] for c in self.contexts],
                            "responses": self.responses})


def load_alpaca_bon(root: str | Path, max_prompts: int | None = None, samples: Sequence[int] | None = None, *,
                    generator: str = "tulu-2-dpo-13b", reference: str = "GPT35t",
                    annotator: str = "weighted_alpaca_eval_gpt4_turbo") -> Candidates:
    """reward-bench's alpaca-bon: each sampled response ``output_2`` of ``<generator>.<i>`` was judged
    against the reference ``output_1`` by the annotator; ``preference`` in [1, 2] is 1 + the judged
    probability that the sample is better. Gold = ``preference - 1`` (0: the reference wins surely, 1: the
    sample wins surely). Prompts are aligned across the sample files by instruction; a prompt whose
    preference is missing in any file is dropped and counted in a warning."""
    folder = Path(root) / "bon_eval" / "alpaca_eval_n=16" / "annotations" / f"annotations_ref={reference}"
    present = sorted(int(p.name.rsplit(".", 1)[1]) for p in folder.glob(f"{generator}.*")
                     if p.name.rsplit(".", 1)[1].isdigit()) if folder.is_dir() else []
    wanted = list(samples) if samples is not None else present
    missing = sorted(set(wanted) - set(present))
    if not wanted or missing:
        raise ValueError(f"{folder}: sample folders {generator}.{missing or '<i>'} not found "
                         f"(present: {present}); set candidates.alpaca_bon.samples to some of them")
    if len(wanted) < 2:
        raise ValueError(f"candidates.alpaca_bon.samples: best-of-N needs at least 2 candidates, got {wanted}")
    files = [folder / f"{generator}.{i}" / annotator / "annotations.json" for i in wanted]
    order: list[str] = []
    by_prompt: dict[str, list[tuple[str, float | None]]] = {}
    for f in files:
        rows = json.loads(f.read_text())
        seen = set()
        for n, r in enumerate(rows):
            instr = r.get("instruction")
            if not isinstance(instr, str) or not isinstance(r.get("output_2"), str):
                raise ValueError(f"{f}: row {n} lacks a string 'instruction' or 'output_2'")
            if instr in seen:
                raise ValueError(f"{f}: row {n}: the instruction appears twice (prompts are aligned by it)")
            seen.add(instr)
            pref = r.get("preference")
            ok = isinstance(pref, (int, float)) and not isinstance(pref, bool) and 1.0 <= pref <= 2.0
            if pref is not None and not ok:
                raise ValueError(f"{f}: row {n}: preference {pref!r} is not a number in [1, 2]")
            if f == files[0]:
                order.append(instr)
            by_prompt.setdefault(instr, []).append((r["output_2"], float(pref) - 1.0 if ok else None))
    keep = [p for p in order if len(by_prompt[p]) == len(files) and all(g is not None for _, g in by_prompt[p])]
    if len(keep) < len(order):
        logger.warning("alpaca-bon: %d of %d prompts dropped (a sample file lacks them or their preference)",
                       len(order) - len(keep), len(order))
    keep = keep[:max_prompts] if max_prompts is not None else keep
    return Candidates(ids=[f"alpaca-bon:{order.index(p)}" for p in keep],
                      contexts=[[Turn("user", p)] for p in keep],
                      responses=[[t for t, _ in by_prompt[p]] for p in keep],
                      gold=[[g for _, g in by_prompt[p]] for p in keep],  # type: ignore[misc]
                      source=f"alpaca-bon/{generator}.{wanted}")


# ---- scorers ----------------------------------------------------------------------------------------
def _dmoerm_scorer(loaded, spec: ScorerSpec) -> Scorer:
    return lambda samples: [[s.reward for s in row] for row in loaded.model.score_samples(samples)]


def _baseline_scorer(loaded, spec: ScorerSpec) -> Scorer:
    if loaded.baseline is None:
        raise ValueError(f"{loaded.path}: this bundle has no single-RM baseline (bundle.json baseline: false); "
                         f"drop the scorer {spec.name!r}")
    return loaded.baseline.score_samples


def _penalised_scorer(loaded, spec: ScorerSpec) -> Scorer:
    from dmoerm.uncertainty import PenalisedRewardModel, bundle_capability_stats

    try:
        stats = bundle_capability_stats(loaded.meta, loaded.model)
    except ValueError as e:
        raise ValueError(f"scorer {spec.name!r} ({spec.kind}) on {loaded.path}: {e}") from None
    return PenalisedRewardModel(loaded.model, stats, 1.0 if spec.weight is None else spec.weight).score_samples


def ensemble_folder(spec: ScorerSpec, bundle_path: str | Path) -> str:
    return spec.ensemble or str(Path(bundle_path) / "ensemble")


def _ensemble_scorer(how: str) -> Callable:
    def build(loaded, spec: ScorerSpec) -> Scorer:
        from dmoerm.ensemble import load_ensemble

        ens = load_ensemble(ensemble_folder(spec, loaded.path), backbone=loaded.model.backbone,
                            batch_size=loaded.model.batch_size)
        return lambda samples: ens.score_samples(samples, how, spec.weight)
    return build


SCORER_KINDS: dict[str, Callable] = {
    "dmoerm": _dmoerm_scorer, "baseline": _baseline_scorer, "dmoerm-uncertainty": _penalised_scorer,
    **{f"ensemble-{how}": _ensemble_scorer(how) for how in ("mean", "min", "uncertainty")}}
"""kind -> (loaded bundle, its ScorerSpec) -> Scorer."""


def build_scorer(spec: ScorerSpec, loaded) -> Scorer:
    return SCORER_KINDS[spec.kind](loaded, spec)


def standardise(rewards: list[list[float]]) -> list[list[float]]:
    """z-scores over all of one model's candidate rewards in the study (mean 0, std 1), so that models
    whose reward scales differ share the proxy axis."""
    flat = [x for row in rewards for x in row]
    mean = sum(flat) / len(flat)
    std = math.sqrt(sum((x - mean) ** 2 for x in flat) / max(1, len(flat) - 1)) or 1.0
    return [[(x - mean) / std for x in row] for row in rewards]


# ---- the arithmetic ------------------------------------------------------------------------------------
def analytic_kl(n: int) -> float:
    """KL(best-of-n || base policy) = log n - (n - 1) / n, in nats."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def best_of_n(proxy: Sequence[float], gold: Sequence[float], n: int) -> tuple[float, float]:
    """(expected gold, expected proxy) of the best-of-n pick over a uniformly random n-subset of one
    prompt's K candidates (see the module docstring)."""
    k = len(proxy)
    if len(gold) != k:
        raise ValueError(f"{k} proxy rewards for {len(gold)} gold scores")
    if not 1 <= n <= k:
        raise ValueError(f"best-of-{n} needs at least {n} candidates, the prompt has {k}")
    order = sorted(range(k), key=lambda i: proxy[i])
    p = [proxy[i] for i in order]
    g = [gold[i] for i in order]
    start = 0
    while start < k:  # a tie group shares its gold (random tie-break)
        end = start
        while end + 1 < k and p[end + 1] == p[start]:
            end += 1
        if end > start:
            g[start: end + 1] = [sum(g[start: end + 1]) / (end + 1 - start)] * (end + 1 - start)
        start = end + 1
    total = math.comb(k, n)
    w = [math.comb(j, n - 1) / total for j in range(k)]
    return sum(a * b for a, b in zip(w, g)), sum(a * b for a, b in zip(w, p))


@dataclass
class BonPoint:
    model: str
    n: int
    kl: float
    gold: float
    gold_low: float
    gold_high: float
    proxy: float
    proxy_low: float
    proxy_high: float
    num_prompts: int


def bon_curves(rewards: dict[str, list[list[float]]], gold: list[list[float]], ns: Sequence[int], *,
               num_bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0) -> list[BonPoint]:
    """Per reward model (its rewards per prompt and candidate) and n: the mean over prompts of the picked
    candidate's gold and standardised proxy, with percentile-bootstrap intervals over prompts (the same
    resampled prompts for every model and n). Adds the :data:`ORACLE` curve (picked by gold; no proxy)."""
    from dmoerm.studies.report import bootstrap_mean

    k = {len(row) for row in gold}
    if max(ns) > min(k):
        raise ValueError(f"ns: best-of-{max(ns)} needs {max(ns)} candidates per prompt; the smallest prompt has "
                         f"{min(k)}")
    out = []
    for name, raw in [*rewards.items(), (ORACLE, gold)]:
        if len(raw) != len(gold) or any(len(a) != len(b) for a, b in zip(raw, gold)):
            raise ValueError(f"{name}: rewards do not match the candidates (one per candidate of each prompt)")
        z = standardise(raw)
        for n in ns:
            picks = [best_of_n(zr, gr, n) for zr, gr in zip(z, gold)]
            g = bootstrap_mean([a for a, _ in picks], num_bootstrap, confidence, seed)
            p = (bootstrap_mean([b for _, b in picks], num_bootstrap, confidence, seed) if name != ORACLE
                 else (math.nan, math.nan, math.nan))
            out.append(BonPoint(name, n, analytic_kl(n), *g, *p, len(gold)))
    return out


# ---- the report ----------------------------------------------------------------------------------------
GOLD_LABEL = "gold: judged P(beats the reference), 0-1"
PROXY_LABEL = "proxy: the model's reward, z-score (std units)"


@dataclass
class BonReport:
    table: object  # dmoerm.studies.report.Table
    points: list[BonPoint]
    figures: dict[str, object]
    raw: dict[str, str]
    metrics: dict[str, float]


def bon_report(points: list[BonPoint], *, gold_label: str = GOLD_LABEL, confidence: float = 0.95,
               title: str = "best-of-N", notes: Sequence[str] = ()) -> BonReport:
    """The table (per model and N: KL, gold and proxy with intervals), the reward-vs-KL plot
    (``bon_reward_vs_kl.png``), the raw numbers (``bon_points.csv``/``.json``) and flat metrics."""
    from dmoerm.names import metric_name
    from dmoerm.studies.report import Table, plot_reward_vs_kl, to_csv, to_json

    pct = f"{confidence:.0%} CI"
    table = Table(f"{title}: gold and proxy reward of the picked response by N (mean over prompts, {pct})",
                  ["model", "N", "KL (nats)", "gold", f"gold {pct}", "proxy (z)", f"proxy {pct}", "prompts"],
                  notes=[f"{gold_label}; {PROXY_LABEL}; {ORACLE}: picked by the gold score itself",
                         *notes])
    for p in points:
        proxy_ci = "-" if math.isnan(p.proxy) else f"[{p.proxy_low:.3f}, {p.proxy_high:.3f}]"
        table.rows.append([p.model, p.n, p.kl, p.gold, f"[{p.gold_low:.3f}, {p.gold_high:.3f}]", p.proxy, proxy_ci,
                           p.num_prompts])
    random_pick = next((p.gold for p in points if p.n == 1 and p.model == ORACLE), None)
    fig = plot_reward_vs_kl(points, title, gold_label, PROXY_LABEL, chance=random_pick, confidence=confidence)
    metrics = {f"{kind}.{metric_name(p.model)}.n{p.n}": getattr(p, kind) for p in points
               for kind in ("gold", "proxy") if not math.isnan(getattr(p, kind))}
    return BonReport(table, points, {"bon_reward_vs_kl.png": fig},
                     {"bon_points.csv": to_csv(points), "bon_points.json": to_json(points, confidence=confidence)},
                     metrics)
