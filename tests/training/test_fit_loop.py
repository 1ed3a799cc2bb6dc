"""The shared pairwise training loop: early stopping restores the best state; no pairs is an error."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dmoerm.training.loop import FitHooks, Group, TrainConfig, fit_pairwise, make_batches


class Scale(nn.Module):
    """reward(row) = w * x[row]: one parameter, so every step is predictable."""

    def __init__(self, w: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w))


X = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
TRAIN = [Group([1, 0], [(0, 1)]), Group([3, 2], [(0, 1)])]  # larger x is better: pushes w up
VAL = [Group([4, 5], [(0, 1)])]  # smaller x is better: right only while w < 0
QUIET = FitHooks(progress=False)


def _record_w(module: Scale, seen: list[float]):
    """A ``log_metric`` that records w after every optimiser step."""
    return lambda name, _value, _step: seen.append(module.w.item()) if name.endswith("train_loss") else None


def _fit(w0: float, patience: int, epochs: int = 10):
    module = Scale(w0)
    seen: list[float] = []
    settings = TrainConfig(lr=0.3, epochs=epochs, batch_size=64, patience=patience, warmup_ratio=0.0,
                             grad_clip=0.0)
    result = fit_pairwise(module, [module.w], lambda rows: module.w * X[list(rows)], TRAIN, VAL, [1] * 6,
                          settings, desc="phase1", hooks=FitHooks(log_metric=_record_w(module, seen), progress=False))
    return module, result, seen


@pytest.mark.parametrize("patience", [1, 2, 3])
def test_stops_after_patience_evaluations_without_improvement_and_restores_the_best(patience):
    module, result, seen = _fit(-0.5, patience)
    # one step and one evaluation per epoch: step 1 leaves w < 0 (val right), later steps make it positive
    assert seen[0] < 0 < seen[-1]
    accs = [h["val_accuracy"] for h in result.history]
    assert accs == [1.0] + [0.0] * patience
    assert result.stopped_early and result.steps == 1 + patience and len(seen) == 1 + patience
    assert result.best_val_accuracy == 1.0
    assert module.w.item() == seen[0]  # the best state is restored bit for bit, not the last one
    assert not module.training


def test_an_equal_validation_accuracy_is_no_improvement():
    # val = train: accuracy is 1.0 at every evaluation, so only the first state counts as the best
    module = Scale(0.5)
    seen: list[float] = []
    settings = TrainConfig(lr=0.3, epochs=10, batch_size=64, patience=2, warmup_ratio=0.0, grad_clip=0.0)
    res = fit_pairwise(module, [module.w], lambda rows: module.w * X[list(rows)], TRAIN, TRAIN, [1] * 6,
                       settings, hooks=FitHooks(log_metric=_record_w(module, seen), progress=False))
    assert [h["val_accuracy"] for h in res.history] == [1.0, 1.0, 1.0]
    assert res.stopped_early and res.steps == 3 and seen[0] < seen[-1]
    assert module.w.item() == seen[0]


def test_max_steps_caps_training():
    module = Scale(0.0)
    settings = TrainConfig(lr=0.1, epochs=50, batch_size=2, patience=50, max_steps=3, warmup_ratio=0.0)
    res = fit_pairwise(module, [module.w], lambda rows: module.w * X[list(rows)], TRAIN, VAL, [1] * 6, settings,
                       hooks=QUIET)
    assert res.steps == 3 and res.epochs_run == 1.5 and not res.stopped_early


def test_without_validation_pairs_the_last_state_is_kept_and_training_never_stops_early():
    module = Scale(-1.0)
    seen: list[float] = []
    settings = TrainConfig(lr=0.1, epochs=6, batch_size=64, patience=1, warmup_ratio=0.0, grad_clip=0.0)
    ties = [Group([4, 5], [])]
    res = fit_pairwise(module, [module.w], lambda rows: module.w * X[list(rows)], TRAIN, ties, [1] * 6, settings,
                       hooks=FitHooks(log_metric=_record_w(module, seen), progress=False))
    assert res.steps == 6 and not res.stopped_early and math.isnan(res.best_val_accuracy)
    assert module.w.item() == seen[-1] and seen[-1] > seen[0]


@pytest.mark.parametrize("desc", ["phase1", "chat/expert/empathy", "phase3"])
def test_no_training_pairs_raises_naming_the_phase(desc):
    module = Scale(0.0)
    ties_only = [Group([0, 1], []), Group([2, 3], [])]
    with pytest.raises(ValueError, match=f"^{desc}: no training pairs"):
        fit_pairwise(module, [module.w], lambda rows: module.w * X[list(rows)], ties_only, VAL, [1] * 6,
                     TrainConfig(), desc=desc, hooks=QUIET)


def test_batches_keep_samples_whole_and_cover_every_sample_once():
    import random

    groups = [Group([2 * i, 2 * i + 1], [(0, 1)]) for i in range(7)]
    lengths = [5, 5, 1, 1, 9, 9, 3, 3, 2, 2, 8, 8, 4, 4]
    batches = make_batches(groups, lengths, batch_size=4, rng=random.Random(0))
    assert sorted(g for b in batches for g in b) == list(range(7))
    assert all(len(b) <= 2 for b in batches)  # 2 rows per sample, 4 rows per batch


@pytest.mark.parametrize(("kwargs", "message"), [({"lr": 0}, "lr must be > 0"), ({"batch_size": 1}, "batch_size"),
                                                 ({"warmup_ratio": 1.0}, "warmup_ratio")])
def test_bad_settings_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)
