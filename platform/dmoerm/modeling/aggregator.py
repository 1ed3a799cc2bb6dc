"""Phase 3: the MLP that turns the frozen experts' hidden states into one reward."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

Activation = Literal["prelu", "relu", "gelu", "tanh"]


@dataclass
class AggregatorConfig:
    """Shape of the aggregator: ``Linear(K*H, hidden) -> activation -> dropout -> Linear(hidden, 1)``."""

    hidden_size: int | None = None
    """Width of the hidden layer; None = the backbone's hidden size H (the paper's choice)."""
    activation: Activation = "prelu"
    """Non-linearity after the first layer (paper: PReLU)."""
    dropout: float = 0.0
    """Dropout after the activation."""

    def __post_init__(self) -> None:
        if self.hidden_size is not None and self.hidden_size < 1:
            raise ValueError(f"aggregator.hidden_size must be >= 1 or null, got {self.hidden_size}")
        if self.activation not in ("prelu", "relu", "gelu", "tanh"):
            raise ValueError(f"aggregator.activation must be prelu, relu, gelu or tanh, got {self.activation!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"aggregator.dropout must be in [0, 1), got {self.dropout}")




def _activation(name: Activation) -> nn.Module:
    return {"prelu": nn.PReLU, "relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}[name]()


class Aggregator(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, spec: AggregatorConfig | None = None) -> None:
        super().__init__()
        spec = spec or AggregatorConfig()
        width = spec.hidden_size or hidden_size
        self.spec, self.num_experts = spec, num_experts
        self.net = nn.Sequential(nn.Linear(num_experts * hidden_size, width), _activation(spec.activation),
                                 nn.Dropout(spec.dropout), nn.Linear(width, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, K, H) expert hidden states -> (B,) rewards."""
        return self.net(features.flatten(1)).squeeze(-1)  # (B, K*H) -> (B,)
