"""RM ensembles: the three combinations on hand-made scores, one trunk pass shared by every member, scores
equal to each member scored alone, and a save/load roundtrip."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import load_tiny, pairwise_samples, perturb_

from dmoerm.ensemble import COMBINATIONS, EnsembleConfig, RewardEnsemble, combine, load_ensemble, save_ensemble
from dmoerm.modeling.reward_model import SingleRewardModel
from dmoerm.modeling.top import TopStack

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def test_combinations_on_hand_made_scores():
    r = torch.tensor([[1.0, 0.0, 3.0],
                      [3.0, 0.0, -1.0]])  # (M=2, N=3)
    assert COMBINATIONS == ("mean", "min", "uncertainty")
    assert combine(r, "mean").tolist() == [2.0, 0.0, 1.0]
    assert combine(r, "min").tolist() == [1.0, 0.0, -1.0]
    # population variance across members: [1, 0, 4]
    assert combine(r, "uncertainty", weight=0.5).tolist() == [1.5, 0.0, -1.0]
    assert combine(r, "uncertainty").tolist() == [1.0, 0.0, -3.0]  # weight 1 by default
    assert combine(r[:1], "uncertainty").tolist() == [1.0, 0.0, 3.0]  # one member: no variance
    with pytest.raises(ValueError, match="unknown ensemble combination 'max'"):
        combine(r, "max")
    with pytest.raises(ValueError, match="members, responses"):
        combine(torch.ones(3), "mean")


def test_config_validation():
    assert EnsembleConfig().member_seeds(7) == [7, 8, 9]
    assert EnsembleConfig(members=2, seeds=[5, 1]).member_seeds(0) == [5, 1]
    with pytest.raises(ValueError, match="ensemble.seeds lists 1 seed"):
        EnsembleConfig(members=2, seeds=[1])
    with pytest.raises(ValueError, match="distinct"):
        EnsembleConfig(members=2, seeds=[1, 1])
    with pytest.raises(ValueError, match="at least 2"):
        EnsembleConfig(members=1)
    with pytest.raises(ValueError, match="uncertainty_weight"):
        EnsembleConfig(uncertainty_weight=-1)


def _members(backbone, m: int = 3) -> list[TopStack]:
    tops = []
    for i in range(m):
        torch.manual_seed(100 + i)
        top = TopStack(backbone)
        perturb_(top, ["value_head", "blocks"], scale=0.3, seed=i)
        tops.append(top)
    return tops


@pytest.fixture(scope="module")
def backbone(tiny_bert_dir):
    return load_tiny(tiny_bert_dir)


def test_one_trunk_pass_for_every_member_and_the_same_scores_as_alone(backbone):
    tops = _members(backbone)
    ens = RewardEnsemble(backbone, tops, batch_size=64, uncertainty_weight=0.5)
    samples = pairwise_samples(6)
    passes = []
    handle = backbone.layers[0].register_forward_hook(lambda *_: passes.append(1))  # the trunk's first block
    try:
        member_rewards = ens.score_members(samples)  # (M, 12)
    finally:
        handle.remove()
    assert member_rewards.shape == (3, 12)
    assert len(passes) == 1  # 12 rows in one batch: one trunk pass, whatever the number of members
    for i, top in enumerate(tops):
        alone = SingleRewardModel(backbone, top, batch_size=4).score_samples(samples)  # other batching too
        assert member_rewards[i].tolist() == pytest.approx([r for row in alone for r in row], abs=1e-6)
    assert not torch.allclose(member_rewards[0], member_rewards[1])  # the members differ
    for how in COMBINATIONS:
        grouped = ens.score_samples(samples, how)
        assert [len(g) for g in grouped] == [2] * 6
        expected = combine(member_rewards, how, 0.5).tolist()
        assert [r for g in grouped for r in g] == pytest.approx(expected, abs=1e-6)
    assert ens.score_samples_all(samples)["min"] == ens.score_samples(samples, "min")


def test_save_load_roundtrip(backbone, tiny_bert_dir, tmp_path):
    tops = _members(backbone, 2)
    ens = RewardEnsemble(backbone, tops, seeds=[3, 4], uncertainty_weight=0.25)
    samples = pairwise_samples(4)
    folder = save_ensemble(tmp_path / "ens", tops, {"seeds": [3, 4], "uncertainty_weight": 0.25}, backbone=backbone)
    meta = json.loads((folder / "ensemble.json").read_text())
    assert meta["members"] == 2 and meta["base"]["fingerprint"] == backbone.fingerprint()
    for loaded in (load_ensemble(folder, backbone), load_ensemble(folder, device="cpu")):  # given / its own base
        assert loaded.seeds == [3, 4] and loaded.uncertainty_weight == 0.25
        assert torch.allclose(loaded.score_members(samples), ens.score_members(samples), atol=1e-6)
    with pytest.raises(ValueError, match="fingerprint differs"):
        from tiny import tiny_backbone

        load_ensemble(folder, tiny_backbone(seed=1))
    (folder / "member-1.safetensors").unlink()
    with pytest.raises(ValueError, match="member-1.safetensors is missing"):
        load_ensemble(folder, backbone)
    with pytest.raises(ValueError, match="ensemble.json is missing"):
        load_ensemble(tmp_path)
