"""The outer sparse router: a classifier over task categories from the context alone.

It reads the frozen trunk's mean-pooled hidden states of the context (no response), so routing costs one
trunk pass over the context and training it needs those features computed once.
"""

from __future__ import annotations

import torch
from torch import nn


class RouterHead(nn.Module):
    def __init__(self, hidden_size: int, categories: list[str], width: int = 0, dropout: float = 0.1) -> None:
        super().__init__()
        if len(categories) < 1 or len(set(categories)) != len(categories):
            raise ValueError(f"router needs distinct category names, got {categories}")
        self.categories = list(categories)
        if width > 0:
            self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden_size, width), nn.GELU(),
                                     nn.Linear(width, len(categories)))
        else:
            self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden_size, len(categories)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, H) pooled context features -> (B, C) logits."""
        return self.net(features)
