"""Stage ``route``: the outer router on the contexts of samples with a known category, and the routed
category for every training sample without one."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from safetensors.torch import load_file

from dmoerm.bundle import save_tensors
from dmoerm.config import PipelineConfig
from dmoerm.data.records import Sample
from dmoerm.data.splits import SPLITS
from dmoerm.modeling.backbone import Backbone
from dmoerm.modeling.router import RouterHead, context_features
from dmoerm.stages.base import backbone_for, device_for, model_id
from dmoerm.stages.data import splits_of
from dmoerm.stages.store import StageStore
from dmoerm.training.loop import MetricFn
from dmoerm.training.phases import train_router


def train_router_on(backbone: Backbone, splits: dict[str, list[Sample]], cfg: PipelineConfig,
                    log_metric: MetricFn | None = None) -> tuple[RouterHead, dict]:
    """The router on phase-1 + phase-3 contexts of known category, validated on ``val``'s; its features are
    ``context_features`` with ``cfg.router``'s input settings, which the head records for scoring."""
    names = [c.name for c in cfg.taxonomy]
    idx = {n: i for i, n in enumerate(names)}
    inputs = cfg.router.resolve(backbone)

    def feats(samples: Sequence[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
        known = [s for s in samples if s.category is not None]
        x = (context_features(backbone, [s.context for s in known], inputs, batch_size=cfg.model.feature_batch_size)
             if known else torch.zeros(0, 1))
        return x, torch.tensor([idx[s.category] for s in known], dtype=torch.long)

    x, y = feats(splits["phase1"] + splits["phase3"])
    vx, vy = feats(splits["val"])
    if len(y) == 0 and len(names) > 1:
        raise ValueError("no sample has a known category: give at least one data source a `category`")
    return train_router(x, y, vx, vy, names, cfg.router.train, width=cfg.router.width, seed=cfg.seed,
                        log_metric=log_metric, inputs=inputs, device=device_for(cfg))


@torch.no_grad()
def assign_categories(backbone: Backbone, router: RouterHead, samples: list[Sample], batch_size: int = 32) -> int:
    """Give the router's category to every sample without one; returns how many were assigned."""
    todo = [s for s in samples if s.category is None]
    if todo:
        feats = context_features(backbone, [s.context for s in todo], router.inputs, batch_size=batch_size)
        pred = router(feats).argmax(-1)  # (N,)
        for s, p in zip(todo, pred.tolist()):
            s.category = router.categories[p]
    return len(todo)


def route_step(cfg: PipelineConfig, store: StageStore, data_key: str) -> str:
    """Train the router; every uncategorised phase-1, phase-3 and validation sample gets the routed category
    (test samples keep theirs: evaluation routes them through the scorer)."""
    key = store.key(data=data_key, model=model_id(cfg), router=cfg.router, taxonomy=cfg.taxonomy, seed=cfg.seed)
    if store.done("route", key) is None:
        bb = backbone_for(cfg)
        splits = splits_of(store, "data", data_key)
        router, metrics = train_router_on(bb, splits, cfg)
        assigned = {n: assign_categories(bb, router, splits[n], cfg.model.feature_batch_size) for n in SPLITS[:3]}
        for name, part in splits.items():
            store.put_samples("route", key, f"{name}.jsonl", part)
        save_tensors(router.state_dict(), store.local("route", key) / "router.safetensors")
        store.mark_done("route", key, {**metrics, "assigned": assigned})
    return key


def load_router(cfg: PipelineConfig, store: StageStore, route_key: str) -> RouterHead:
    bb = backbone_for(cfg)
    head = RouterHead(bb.hidden_size, [c.name for c in cfg.taxonomy], width=cfg.router.width,
                      inputs=cfg.router.resolve(bb))
    head.load_state_dict(load_file(str(store.path("route", route_key, "router.safetensors"))))
    return head.eval()
