"""Judge labeling spread over Ray workers under one global concurrency limit."""

from __future__ import annotations

import dataclasses

import ray

from dmoerm.data.records import Sample
from dmoerm.labeling import JudgeConfig, label_samples


@ray.remote(num_cpus=0.5)
def _label_shard(samples: list[Sample], capabilities: dict[str, list[str]], cfg: JudgeConfig) -> tuple[dict, dict]:
    report = label_samples(samples, capabilities, cfg, progress=False)
    return {s.id: s.capability_prefs for s in samples}, dataclasses.asdict(report)


@dataclasses.dataclass
class RayLabeler:
    """A ``labeler`` for the labels stage: shards by sample id (the same questions land on the same shard
    and its answer cache on every run); each shard gets ``concurrency // num_workers`` requests."""

    num_workers: int

    def __call__(self, samples: list[Sample], capabilities: dict[str, list[str]], cfg: JudgeConfig) -> dict:
        n = max(1, min(self.num_workers, cfg.concurrency, len(samples)))
        ordered = sorted(samples, key=lambda s: s.id)
        futures = []
        for i in range(n):
            cache = f"{cfg.cache_path}.{i}-of-{n}" if cfg.cache_path else None
            shard_cfg = dataclasses.replace(cfg, concurrency=max(1, cfg.concurrency // n), cache_path=cache)
            futures.append(_label_shard.remote(ordered[i::n], capabilities, shard_cfg))
        by_id = {s.id: s for s in samples}
        totals: dict = {}
        for prefs, report in ray.get(futures):
            for sid, p in prefs.items():
                by_id[sid].capability_prefs = p
            for k, v in report.items():
                if isinstance(v, (int, float)):
                    totals[k] = totals.get(k, 0) + v
        return totals
