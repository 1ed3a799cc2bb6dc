"""The configured base model, loaded once per process and shared by every stage that runs there, on the
configured device (``model.device``; ``auto``: cuda when this process sees a GPU) in ``model.precision``."""

from __future__ import annotations

import functools

import torch

from dmoerm.config import PipelineConfig
from dmoerm.modeling.backbone import Backbone


@functools.lru_cache(maxsize=2)
def _backbone(base: str, top_layers: int, pooling: str, max_length: int, revision: str | None,
              trust_remote_code: bool, device: str, precision: str, gradient_checkpointing: bool) -> Backbone:
    from dmoerm.modeling.backbone import load_backbone

    return load_backbone(base, top_layers=top_layers, pooling=pooling, max_length=max_length, revision=revision,
                         trust_remote_code=trust_remote_code, device=device, precision=precision,  # type: ignore[arg-type]
                         gradient_checkpointing=gradient_checkpointing)


def device_for(cfg: PipelineConfig) -> torch.device:
    """The device ``model.device`` means in this process (``auto``: cuda when torch sees a GPU)."""
    from dmoerm.device import resolve_device

    return resolve_device(cfg.model.device)


def backbone_for(cfg: PipelineConfig) -> Backbone:
    m = cfg.model
    return _backbone(m.base, m.top_layers, m.pooling, m.max_length, m.revision, m.trust_remote_code,
                     str(device_for(cfg)), m.precision, m.gradient_checkpointing)


def model_id(cfg: PipelineConfig) -> dict:
    """What identifies the frozen base in a stage key."""
    m = cfg.model
    return {"base": m.base, "revision": m.revision, "top_layers": m.top_layers, "pooling": m.pooling,
            "max_length": m.max_length, "precision": m.precision}
