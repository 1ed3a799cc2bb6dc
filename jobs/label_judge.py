"""Judge labeling spread over Ray workers under one global concurrency limit."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging

import ray

from dmoerm.data.records import Sample
from dmoerm.labeling import JudgeConfig, LabelReport, label_samples

logger = logging.getLogger(__name__)


@ray.remote(num_cpus=0.5)
def _label_shard(samples: list[Sample], capabilities: dict[str, list[str]], cfg: JudgeConfig
                 ) -> tuple[dict, LabelReport]:
    report = label_samples(samples, capabilities, cfg, progress=False)
    return {s.id: s.capability_prefs for s in samples}, report


def shard_of(sample: Sample, num_shards: int) -> int:
    """A sample's shard, from its conversation: every question about one conversation (the conversation is
    part of each question) lands on one shard, where an identical question is asked once. The answer cache
    does not depend on it: it is keyed by the question."""
    text = json.dumps([[t.role, t.content] for t in sample.context], ensure_ascii=False)
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16) % num_shards


@dataclasses.dataclass
class RayLabeler:
    """A ``labeler`` for the labels stage: one Ray task per shard, each getting ``concurrency // num_workers``
    requests. Every shard reads and writes the same answer cache (``cfg.cache_path``, on shared storage),
    keyed by the question, so any number of workers, on any nodes, re-asks nothing a run paid for."""

    num_workers: int

    def __call__(self, samples: list[Sample], capabilities: dict[str, list[str]], cfg: JudgeConfig) -> LabelReport:
        if cfg.cache_path is None:
            logger.warning("judge cache_path is None: every Ray worker keeps its answers in memory only")
        n = max(1, min(self.num_workers, cfg.concurrency, len(samples)))
        shards: list[list[Sample]] = [[] for _ in range(n)]
        for s in sorted(samples, key=lambda s: s.id):
            shards[shard_of(s, n)].append(s)
        shard_cfg = dataclasses.replace(cfg, concurrency=max(1, cfg.concurrency // n))
        futures = [_label_shard.remote(shard, capabilities, shard_cfg) for shard in shards if shard]
        by_id = {s.id: s for s in samples}
        totals = LabelReport(workers=0)
        for prefs, report in ray.get(futures):
            for sid, p in prefs.items():
                by_id[sid].capability_prefs = p
            totals.add(report)
        logger.info("judge labeling on %d workers: %d questions (%d asked, %d cached)", totals.workers,
                    totals.questions_total, totals.asked, totals.cache_hits)
        return totals
