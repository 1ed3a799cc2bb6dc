"""The configured base model, loaded once per process and shared by every stage that runs there."""

from __future__ import annotations

import functools

from dmoerm.config import PipelineConfig
from dmoerm.modeling.backbone import Backbone


@functools.lru_cache(maxsize=2)
def _backbone(base: str, top_layers: int, pooling: str, max_length: int, revision: str | None,
              trust_remote_code: bool) -> Backbone:
    from dmoerm.modeling.backbone import load_backbone

    return load_backbone(base, top_layers=top_layers, pooling=pooling, max_length=max_length, revision=revision,
                         trust_remote_code=trust_remote_code)


def backbone_for(cfg: PipelineConfig) -> Backbone:
    m = cfg.model
    return _backbone(m.base, m.top_layers, m.pooling, m.max_length, m.revision, m.trust_remote_code)


def model_id(cfg: PipelineConfig) -> dict:
    """What identifies the frozen base in a stage key."""
    m = cfg.model
    return {"base": m.base, "revision": m.revision, "top_layers": m.top_layers, "pooling": m.pooling,
            "max_length": m.max_length, "precision": m.precision}
