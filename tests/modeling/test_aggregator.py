"""The phase-3 aggregator's shape: the paper's Linear(K*H, H) -> PReLU -> Linear(H, 1) by default."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dmoerm.modeling.aggregator import Aggregator, AggregatorConfig


def test_default_aggregator_is_the_papers_mlp():
    agg = Aggregator(num_experts=3, hidden_size=8)
    linears = [m for m in agg.net if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(24, 8), (8, 1)]
    assert isinstance(agg.net[1], nn.PReLU)
    assert [type(m) for m in agg.net if not isinstance(m, nn.Dropout)] == [nn.Linear, nn.PReLU, nn.Linear]
    features = torch.randn(5, 3, 8)  # (B, K, H)
    out = agg(features)
    assert out.shape == (5,)
    torch.testing.assert_close(out, agg.net(features.reshape(5, 24)).squeeze(-1))


def test_aggregator_reads_every_expert():
    torch.manual_seed(0)
    agg = Aggregator(num_experts=2, hidden_size=4).eval()
    x = torch.randn(1, 2, 4)
    y = x.clone()
    y[0, 1] += 1.0  # only the second expert's features change
    assert not torch.allclose(agg(x), agg(y))


def test_hidden_width_and_activation_are_configurable():
    agg = Aggregator(2, 8, AggregatorConfig(hidden_size=5, activation="gelu", dropout=0.1))
    assert agg.net[0].out_features == 5 and isinstance(agg.net[1], nn.GELU) and agg.net[2].p == 0.1


@pytest.mark.parametrize(("kwargs", "field"), [({"hidden_size": 0}, "aggregator.hidden_size"),
                                               ({"activation": "swish"}, "aggregator.activation"),
                                               ({"dropout": 1.0}, "aggregator.dropout")])
def test_bad_aggregator_settings_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        AggregatorConfig(**kwargs)
