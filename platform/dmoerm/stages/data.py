"""Stage ``data``: load every source, subsample per category, split prompt-disjointly."""

from __future__ import annotations

import logging

from dmoerm.config import PipelineConfig
from dmoerm.data.loaders import load_sources
from dmoerm.data.records import Sample
from dmoerm.data.splits import SPLITS, hash_order, split_samples
from dmoerm.stages.store import StageStore, fingerprint_uri

logger = logging.getLogger(__name__)


def subsample(samples: list[Sample], limit: int | None, seed: int) -> list[Sample]:
    """A seeded, order-independent subsample of at most ``limit`` samples."""
    if limit is None or len(samples) <= limit:
        return samples
    return sorted(samples, key=lambda s: hash_order(seed, s.id))[:limit]


def load_data(cfg: PipelineConfig) -> tuple[list[Sample], dict]:
    """Load every source (skips reported, never silent; a sample id in two sources is a DataError) and
    subsample per category."""
    samples, report = [], {"sources": []}
    for src, res in zip(cfg.data.sources, load_sources(cfg.data.sources)):
        logger.info(res.summary())
        report["sources"].append({"path": src.path, "loaded": len(res.samples), "skipped": len(res.skipped),
                                  "summary": res.summary()})
        samples.extend(res.samples)
    by_cat: dict[str | None, list[Sample]] = {}
    for s in samples:
        by_cat.setdefault(s.category, []).append(s)
    kept = []
    for cat in sorted(by_cat, key=str):
        kept.extend(subsample(by_cat[cat], cfg.data.max_samples_per_category, cfg.seed))
    report["samples"] = len(kept)
    return kept, report


def data_step(cfg: PipelineConfig, store: StageStore) -> str:
    files = {s.path: fingerprint_uri(s.path) for s in cfg.data.sources}
    key = store.key(data=cfg.data, seed=cfg.seed, files=files)
    if store.done("data", key) is None:
        samples, report = load_data(cfg)
        for name, part in split_samples(samples, cfg.data.splits).items():
            store.put_samples("data", key, f"{name}.jsonl", part)
        store.mark_done("data", key, report)
    return key


def splits_of(store: StageStore, stage: str, key: str, category: str | None = None) -> dict[str, list[Sample]]:
    """The four splits a stage wrote (only ``category``'s samples when given)."""
    splits = {name: store.get_samples(stage, key, f"{name}.jsonl") for name in SPLITS}
    if category is None:
        return splits
    return {k: [s for s in v if s.category == category] for k, v in splits.items()}
