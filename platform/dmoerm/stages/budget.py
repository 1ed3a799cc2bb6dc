"""Which human-labelled data each model may learn from, and how much each had: the report's data budgets.

DMoERM learns from human preferences in three places: phase 1 (the ``phase1`` split, per category),
phase 3 (the ``phase3`` split, the aggregators) and, with ``labels.source: dataset``, the capability label
sources (each expert's train and early-stopping parts; held-out prompts already removed by the labels
stage). Judge and attribute labels are on phase-1 samples, so they add no human-ranked sample. The single
RM trains on every one of those samples, deduplicated by content: both models have the same
human-labelled budget. Both select checkpoints on the ``val`` split; neither sees a test prompt.
"""

from __future__ import annotations

import hashlib
import json

from dmoerm.data.records import Sample
from dmoerm.stages.data import splits_of
from dmoerm.stages.store import StageStore


def sample_key(s: Sample) -> str:
    """The same human judgement, wherever it was loaded from: context, responses and ranks."""
    text = json.dumps([s.prompt_key, list(s.responses), list(s.ranks)], ensure_ascii=False)
    return hashlib.sha1(text.encode()).hexdigest()


def label_source_samples(store: StageStore, label_key: str) -> list[Sample]:
    """Every sample the labels stage gave an expert (train and early-stopping parts, every capability)."""
    return [s for entry in store.get_json("labels", label_key, "index.json")
            for s in store.get_samples("labels", label_key, entry["file"])]


def _unique(samples: list[Sample]) -> list[Sample]:
    seen: dict[str, Sample] = {}
    for s in samples:
        seen.setdefault(sample_key(s), s)
    return list(seen.values())


def baseline_train_samples(store: StageStore, route_key: str, label_key: str) -> list[Sample]:
    """The single RM's training set: every human-ranked sample any part of DMoERM learnt from."""
    splits = splits_of(store, "route", route_key)
    return _unique(splits["phase1"] + splits["phase3"] + label_source_samples(store, label_key))


def _size(samples: list[Sample]) -> dict[str, int]:
    return {"samples": len(samples), "pairs": sum(len(s.pairs()) for s in samples)}


def data_budgets(store: StageStore, route_key: str, label_key: str, baseline: bool) -> dict:
    """Human-labelled samples and pairs each model learnt from (distinct), by part, and the shared
    selection (validation) and test sets."""
    splits = splits_of(store, "route", route_key)
    labels = label_source_samples(store, label_key)
    dmoerm = _unique(splits["phase1"] + splits["phase3"] + labels)
    parts = {"phase1": _size(splits["phase1"]), "phase3": _size(splits["phase3"]),
             "label_sources": _size(_unique(labels)),
             "label_sources_outside_phase1_phase3": _size(
                 [s for s in _unique(labels)
                  if sample_key(s) not in {sample_key(x) for x in splits["phase1"] + splits["phase3"]}])}
    out = {"dmoerm": {**_size(dmoerm), "parts": parts}, "validation": _size(splits["val"]),
           "test": _size(splits["test"])}
    if baseline:
        out["baseline"] = _size(baseline_train_samples(store, route_key, label_key))
    return out


def budget_lines(budgets: dict, tuning: str) -> list[str]:
    """The report's lines about what each model had."""
    d = budgets["dmoerm"]
    lines = [f"data budget (distinct human-ranked samples/pairs learnt from): DMoERM {d['samples']}/{d['pairs']} "
             f"(phase 1 {d['parts']['phase1']['samples']}, phase 3 {d['parts']['phase3']['samples']}, "
             f"label sources {d['parts']['label_sources']['samples']})"
             + (f", single RM {budgets['baseline']['samples']}/{budgets['baseline']['pairs']}"
                if "baseline" in budgets else "")]
    lines.append(f"both select on {budgets['validation']['samples']} validation samples and are tested on the same "
                 f"{budgets['test']['pairs']} pairs; tuning: {tuning}")
    return lines
