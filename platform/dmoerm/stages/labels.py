"""Stage ``labels``: capability labels for every (category, capability) expert, from preference datasets,
rating columns or an LLM judge. No prompt of phase 3, validation or test ever trains an expert."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from dmoerm.config import PipelineConfig
from dmoerm.configtools import to_dict
from dmoerm.data.loaders import load_sources
from dmoerm.data.records import Sample
from dmoerm.data.splits import hash_order
from dmoerm.labeling.judge import JudgeConfig
from dmoerm.names import safe_name
from dmoerm.stages.data import splits_of, subsample
from dmoerm.stages.store import StageStore, fingerprint_uri

logger = logging.getLogger(__name__)
Labeler = Callable[[list[Sample], dict[str, list[str]], JudgeConfig], object]
"""``label_samples``'s signature: fills ``capability_prefs`` in place, returns a report."""


@dataclass
class CapabilityData:
    """Per (category, capability): labelled samples for the expert's training and early stopping."""

    train: dict[tuple[str, str], list[Sample]] = field(default_factory=dict)
    val: dict[tuple[str, str], list[Sample]] = field(default_factory=dict)
    report: dict = field(default_factory=dict)


def split_by_prompt(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(train, val): a seeded ``fraction`` of the prompts (never half a prompt) goes to val."""
    val_keys = {k for k in {s.prompt_key for s in samples}
                if int(hash_order(seed, "val:" + k)[:8], 16) / 0xFFFFFFFF < fraction}
    return [s for s in samples if s.prompt_key not in val_keys], [s for s in samples if s.prompt_key in val_keys]


def label_capabilities(cfg: PipelineConfig, splits: dict[str, list[Sample]], labeler: Labeler | None = None
                       ) -> CapabilityData:
    """Capability labels for every expert. ``labeler`` replaces the in-process judge call (the Ray job
    passes one that spreads the questions over workers under one global concurrency limit)."""
    from dmoerm.labeling import label_samples, labels_from_attributes, labels_from_dataset, load_attribute_ratings

    out = CapabilityData()
    held_out = {s.prompt_key for name in ("phase3", "val", "test") for s in splits[name]}
    frac, seed = cfg.labels.expert_val_fraction, cfg.seed
    if cfg.labels.source == "dataset":
        for cap, sources in sorted(cfg.labels.datasets.items()):
            loaded = [s for res in load_sources(sources) for s in res.samples]  # ids unique across them
            clean = [s for s in loaded if s.prompt_key not in held_out]
            excluded = len(loaded) - len(clean)
            clean = subsample(clean, cfg.labels.max_samples_per_capability, seed)
            labels_from_dataset(clean, cap)
            train, val = split_by_prompt(clean, frac, seed)
            out.report[cap] = {"loaded": len(loaded), "excluded_held_out_prompts": excluded, "train": len(train),
                               "val": len(val)}
            logger.info("capability %s: %s", cap, out.report[cap])
            for cat in cfg.taxonomy:
                if cap in cat.capabilities:
                    out.train[(cat.name, cap)], out.val[(cat.name, cap)] = train, val
        return out
    phase1 = splits["phase1"]
    if cfg.labels.source == "judge":
        report = (labeler or label_samples)(phase1, cfg.capabilities, cfg.labels.judge)
        out.report["judge"] = report.__dict__ if hasattr(report, "__dict__") else str(report)
    else:
        n = labels_from_attributes(phase1, load_attribute_ratings(cfg.labels.attributes_path))
        out.report["attributes"] = {"labelled_pairs": n}
    for cat in cfg.taxonomy:
        mine = [s for s in phase1 if s.category == cat.name]
        for cap in cat.capabilities:
            labelled = [s for s in mine if s.capability_prefs.get(cap)]
            out.train[(cat.name, cap)], out.val[(cat.name, cap)] = split_by_prompt(labelled, frac, seed)
    return out


def with_judge_cache(cfg: PipelineConfig) -> PipelineConfig:
    """``cfg`` with the judge's answer cache defaulted to ``<platform.storage_uri>/judge-cache``: on the
    run's storage, shared by every run, worker and ``dmoerm label``, so no paid question is asked twice."""
    from dataclasses import replace

    from dmoerm.storage import join_uri

    if cfg.labels.judge is None or cfg.labels.judge.cache_path is not None:
        return cfg
    judge = replace(cfg.labels.judge, cache_path=join_uri(cfg.platform.storage_uri, "judge-cache"))
    return replace(cfg, labels=replace(cfg.labels, judge=judge))


def label_step(cfg: PipelineConfig, store: StageStore, route_key: str, labeler: Labeler | None = None) -> str:
    """Labels per (category, capability) and part (train/val), one jsonl each, and their index."""
    label_cfg = to_dict(cfg.labels)
    if cfg.labels.judge is not None:  # the cache location does not change the labels
        label_cfg["judge"].pop("cache_path", None)
        label_cfg["judge"].pop("concurrency", None)
        cfg = with_judge_cache(cfg)
    files = {s.path: fingerprint_uri(s.path) for v in cfg.labels.datasets.values() for s in v}
    if cfg.labels.source == "attributes" and cfg.labels.attributes_path:  # edited ratings re-label
        files[cfg.labels.attributes_path] = fingerprint_uri(cfg.labels.attributes_path)
    key = store.key(route=route_key, labels=label_cfg, files=files, taxonomy=cfg.taxonomy, seed=cfg.seed)
    if store.done("labels", key) is None:
        caps = label_capabilities(cfg, splits_of(store, "route", route_key), labeler=labeler)
        index = []
        for (cat, cap), train in caps.train.items():
            for part, samples in (("train", train), ("val", caps.val[(cat, cap)])):
                name = label_file(cat, cap, part)
                store.put_samples("labels", key, name, samples)
                index.append({"category": cat, "capability": cap, "part": part, "file": name, "n": len(samples)})
        store.put_json("labels", key, "index.json", index)
        store.mark_done("labels", key, caps.report)
    return key


def capability_samples(store: StageStore, label_key: str, category: str, capability: str, part: str
                       ) -> list[Sample]:
    return store.get_samples("labels", label_key, label_file(category, capability, part))


def label_file(category: str, capability: str, part: str) -> str:
    """``<category>.<capability>.<part>.jsonl`` with both names in their safe form (no dot, no separator:
    one file in the stage folder, and the three parts never run into each other)."""
    return f"{safe_name(category)}.{safe_name(capability)}.{part}.jsonl"
