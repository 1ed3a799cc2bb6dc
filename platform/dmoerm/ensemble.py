"""RM ensembles: several single reward models (the single-RM recipe, different seeds) on one frozen backbone,
the baselines of the ensemble papers, combined per response as the mean, the worst case (min) or the mean
minus a weight times the variance across members (uncertainty-weighted).

Scoring runs the shared trunk ONCE per row and every member's top on those states. An ensemble is saved as
one folder:

    ensemble.json              format, members, seeds, uncertainty weight, base (as a bundle's), extra meta
    tokenizer/                 the tokenizer files (when saved with its backbone)
    member-<i>.safetensors     member i's top (top blocks, norm, value head)

Weights are safetensors only; metadata is JSON.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from dmoerm.bundle import base_meta, read_format_json, save_tensors
from dmoerm.data.records import Sample, Turn
from dmoerm.modeling.backbone import Backbone, Encoded, length_batches
from dmoerm.modeling.reward_model import SingleRewardModel
from dmoerm.modeling.top import TopStack

logger = logging.getLogger(__name__)
ENSEMBLE_FORMAT = 1
COMBINATIONS = ("mean", "min", "uncertainty")
Combination = Literal["mean", "min", "uncertainty"]


def combine(member_rewards: torch.Tensor, how: str, weight: float = 1.0) -> torch.Tensor:
    """(M, N) member rewards -> (N,): the ``mean``, the ``min`` (worst case), or ``uncertainty``: the mean
    minus ``weight`` times the variance across members (population variance, ``unbiased=False``)."""
    if how not in COMBINATIONS:
        raise ValueError(f"unknown ensemble combination {how!r}; expected one of {COMBINATIONS}")
    if member_rewards.dim() != 2 or member_rewards.size(0) < 1:
        raise ValueError(f"member rewards must be (members, responses) with at least one member, got shape "
                         f"{tuple(member_rewards.shape)}")
    if how == "mean":
        return member_rewards.mean(0)
    if how == "min":
        return member_rewards.min(0).values
    return member_rewards.mean(0) - weight * member_rewards.var(0, unbiased=False)


@dataclass
class EnsembleConfig:
    """RM-ensemble baselines (``ensemble:`` in the pipeline config): single RMs trained like the baseline
    (its training set, settings and tuning) with different seeds."""

    members: int = 3
    """Number of members (0: no ensemble; the pipeline's default)."""
    seeds: list[int] | None = None
    """One seed per member; None: ``seed, seed + 1, ...`` from the run's seed (member 0 is then the single RM
    itself: same recipe, same seed, same stage key, trained once)."""
    uncertainty_weight: float = 1.0
    """``uncertainty`` combination: mean minus this times the variance across members."""

    def __post_init__(self) -> None:
        if self.members < 0:
            raise ValueError(f"ensemble.members must be >= 0, got {self.members}")
        if self.members == 1:
            raise ValueError("ensemble.members must be 0 (no ensemble) or at least 2, got 1")
        if self.seeds is not None:
            if len(self.seeds) != self.members:
                raise ValueError(f"ensemble.seeds lists {len(self.seeds)} seed(s) but ensemble.members is "
                                 f"{self.members}; give one seed per member")
            if len(set(self.seeds)) != len(self.seeds):
                raise ValueError(f"ensemble.seeds must be distinct (equal seeds train equal members): {self.seeds}")
        if self.uncertainty_weight < 0:
            raise ValueError(f"ensemble.uncertainty_weight must be >= 0, got {self.uncertainty_weight}")

    def member_seeds(self, run_seed: int) -> list[int]:
        """The members' seeds: ``seeds`` or ``run_seed, run_seed + 1, ...``."""
        return list(self.seeds) if self.seeds is not None else [run_seed + i for i in range(self.members)]


class RewardEnsemble:
    """``members`` single RMs (``SingleRewardModel``) on one shared backbone, combined per response."""

    def __init__(self, backbone: Backbone, members: Sequence[TopStack], *, batch_size: int = 32,
                 max_batch_tokens: int | None = None, seeds: Sequence[int] | None = None,
                 uncertainty_weight: float = 1.0) -> None:
        if not members:
            raise ValueError("an ensemble needs at least one member")
        if seeds is not None and len(seeds) != len(members):
            raise ValueError(f"{len(seeds)} seeds for {len(members)} members")
        self.backbone, self.batch_size, self.max_batch_tokens = backbone, batch_size, max_batch_tokens
        self.members = [SingleRewardModel(backbone, top, batch_size, max_batch_tokens) for top in members]
        self.seeds = list(seeds) if seeds is not None else None
        self.uncertainty_weight = uncertainty_weight

    @property
    def tops(self) -> list[TopStack]:
        return [m.top for m in self.members]

    @torch.no_grad()
    def score_trunk(self, enc: Encoded, hidden: torch.Tensor) -> torch.Tensor:
        """(M, B) member rewards of a padded batch from its (B, T, H) trunk states (computed once, maybe by
        another model: ``RewardModel``'s trunk hook)."""
        args, kwargs = self.backbone.layer_inputs(enc.attention_mask)  # built once for every member
        return torch.stack([m.top(hidden, enc.attention_mask, args, kwargs)[1] for m in self.members]).cpu()  # (M, B)

    @torch.no_grad()
    def score(self, contexts: Sequence[Sequence[Turn]], responses: Sequence[str]) -> torch.Tensor:
        """(M, N) member rewards of N (context, response) rows: one trunk pass per row, shared by all members."""
        if len(contexts) != len(responses):
            raise ValueError(f"{len(contexts)} contexts for {len(responses)} responses")
        out = torch.zeros(len(self.members), len(responses))  # (M, N)
        if not responses:
            return out
        rows = self.backbone.tokenize(contexts, responses)
        for batch in length_batches([len(r.ids) for r in rows], self.batch_size, self.max_batch_tokens):
            enc = self.backbone.pad([rows[i] for i in batch])
            out[:, batch] = self.score_trunk(enc, self.backbone.trunk(enc))  # (M, B)
        return out

    def score_members(self, samples: Sequence[Sample]) -> torch.Tensor:
        """(M, total responses) member rewards, samples' responses in order."""
        return self.score([s.context for s in samples for _ in s.responses],
                          [r for s in samples for r in s.responses])

    def combined(self, member_rewards: torch.Tensor, how: str = "mean", weight: float | None = None) -> torch.Tensor:
        """``combine`` with this ensemble's ``uncertainty_weight`` unless ``weight`` is given."""
        return combine(member_rewards, how, self.uncertainty_weight if weight is None else weight)

    def score_samples(self, samples: Sequence[Sample], how: str = "mean", weight: float | None = None
                      ) -> list[list[float]]:
        """Combined rewards per sample (one per response)."""
        return per_sample(samples, self.combined(self.score_members(samples), how, weight).tolist())

    def score_samples_all(self, samples: Sequence[Sample], weight: float | None = None
                          ) -> dict[str, list[list[float]]]:
        """Every combination's rewards per sample from ONE scoring pass: {combination: rewards per sample}."""
        members = self.score_members(samples)
        return {how: per_sample(samples, self.combined(members, how, weight).tolist()) for how in COMBINATIONS}


def per_sample(samples: Sequence[Sample], flat: Sequence[float]) -> list[list[float]]:
    """Regroup one value per response (samples in order) into one list per sample."""
    out, k = [], 0
    for s in samples:
        out.append(list(flat[k: k + len(s.responses)]))
        k += len(s.responses)
    if k != len(flat):
        raise ValueError(f"{len(flat)} values for {k} responses")
    return out


def save_ensemble(path: str | Path, members: Sequence[TopStack], meta: dict[str, Any] | None = None,
                  backbone: Backbone | None = None) -> Path:
    """Write the members' tops and ``ensemble.json`` (``meta`` merged in: seeds, uncertainty weight, ...) to a
    local folder; with ``backbone``, also its ``base`` entry and tokenizer, so the folder loads on its own."""
    if not members:
        raise ValueError("save_ensemble: no members")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    for i, top in enumerate(members):
        save_tensors(top.state_dict(), folder / f"member-{i}.safetensors")
    info = {"format": ENSEMBLE_FORMAT, **(meta or {}), "members": len(members)}
    if backbone is not None:
        info["base"] = base_meta(backbone)
        backbone.tokenizer.save_pretrained(str(folder / "tokenizer"))
    (folder / "ensemble.json").write_text(json.dumps(info, indent=2, ensure_ascii=False))
    logger.info("ensemble of %d members written to %s", len(members), folder)
    return folder


def load_ensemble(path: str | Path, backbone: Backbone | None = None, *, device: str | torch.device = "auto",
                  batch_size: int = 32, max_batch_tokens: int | None = None,
                  check_fingerprint: bool = True) -> RewardEnsemble:
    """An ensemble folder (``save_ensemble``) on ``backbone``, or on the base its ``ensemble.json`` names
    (loaded with the folder's tokenizer, or its bundle's: ``<bundle>/ensemble`` beside ``<bundle>/tokenizer``)."""
    from safetensors.torch import load_file

    from dmoerm.device import resolve_device
    from dmoerm.modeling.backbone import load_backbone

    folder = Path(path)
    meta_path = folder / "ensemble.json"
    meta = read_format_json(folder, "ensemble.json", ENSEMBLE_FORMAT, "ensemble", "an ensemble")
    base = meta.get("base")
    if backbone is None:
        if base is None:
            raise ValueError(f"{meta_path} names no base model (saved without its backbone): pass backbone=")
        tok = next((str(p) for p in (folder / "tokenizer", folder.parent / "tokenizer") if p.is_dir()), None)
        backbone = load_backbone(base["reference"], top_layers=base["top_layers"], pooling=base["pooling"],
                                 max_length=base["max_length"], revision=base["revision"], tokenizer_path=tok,
                                 device=resolve_device(device), precision=base.get("precision", "float32"))
    if check_fingerprint and base is not None and backbone.fingerprint() != base["fingerprint"]:
        raise ValueError(f"{meta_path}: the given base model is not the one this ensemble was trained on "
                         "(weight fingerprint differs)")
    tops = []
    for i in range(int(meta["members"])):
        file = folder / f"member-{i}.safetensors"
        if not file.exists():
            raise ValueError(f"{meta_path} lists {meta['members']} members but {file.name} is missing")
        top = TopStack(backbone)
        top.load_state_dict(load_file(str(file)))
        tops.append(top)
    return RewardEnsemble(backbone, tops, batch_size=batch_size, max_batch_tokens=max_batch_tokens,
                          seeds=meta.get("seeds"), uncertainty_weight=float(meta.get("uncertainty_weight", 1.0)))
