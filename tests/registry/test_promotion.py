"""The promotion rule on hand-made outcomes: paired bootstrap over pairs plus a per-category guard."""

from __future__ import annotations

import pytest

from dmoerm.promotion import PairOutcome, PromotionConfig, decide

FAST = PromotionConfig(num_bootstrap=500)


def outcomes(num_correct: dict[str, int], num_pairs: int = 100, offset: int = 0) -> dict[str, PairOutcome]:
    """``num_pairs`` pairs per category; pairs ``offset .. offset+num_correct-1`` (cyclically) are correct."""
    out = {}
    for cat, k in num_correct.items():
        correct = {(offset + j) % num_pairs for j in range(k)}
        for i in range(num_pairs):
            out[f"{cat}-{i:03d}"] = PairOutcome(cat, i in correct)
    return out


def test_clearly_better_is_promoted() -> None:
    incumbent = outcomes({"chat": 60, "code": 60})
    candidate = outcomes({"chat": 80, "code": 75})
    d = decide(candidate, incumbent, FAST)
    assert d.promote
    assert d.delta == pytest.approx(0.175)
    assert 0 < d.ci_low < d.delta < d.ci_high
    assert d.reason.startswith("Promoted:")
    assert "0.775 vs incumbent 0.600 on 200 pairs" in d.reason
    assert d.per_category["code"] == {
        "num_pairs": 100, "candidate_accuracy": 0.75, "incumbent_accuracy": 0.6, "delta": pytest.approx(0.15)
    }


def test_identical_outcomes_are_refused() -> None:
    same = outcomes({"chat": 70, "code": 70})
    d = decide(dict(same), dict(same), FAST)
    assert not d.promote
    assert (d.delta, d.ci_low, d.ci_high) == (0.0, 0.0, 0.0)
    assert "confidence interval is not above 0" in d.reason


def test_same_accuracy_on_different_pairs_is_refused() -> None:
    incumbent = outcomes({"chat": 70})
    candidate = outcomes({"chat": 70}, offset=20)  # right on 20 pairs the incumbent missed, and vice versa
    d = decide(candidate, incumbent, FAST)
    assert not d.promote
    assert d.delta == 0.0 and d.ci_low < 0 < d.ci_high


def test_better_overall_but_one_category_much_worse_is_refused_naming_it() -> None:
    incumbent = outcomes({"chat": 50, "code": 80, "math": 60})
    candidate = outcomes({"chat": 90, "code": 65, "math": 60})
    d = decide(candidate, incumbent, FAST)
    assert d.delta > 0 and d.ci_low > 0  # the interval alone would promote
    assert not d.promote
    assert "category 'code' dropped from 0.800 to 0.650 (-0.150, tolerance 0.020, 100 pairs)" in d.reason
    assert "'chat'" not in d.reason and "'math'" not in d.reason
    assert "interval is not above 0" not in d.reason


def test_category_drop_within_tolerance_is_accepted() -> None:
    incumbent = outcomes({"chat": 50, "code": 80})
    candidate = outcomes({"chat": 90, "code": 79})
    assert decide(candidate, incumbent, PromotionConfig(num_bootstrap=500, category_tolerance=0.02)).promote
    strict = PromotionConfig(num_bootstrap=500, category_tolerance=0.0)
    assert not decide(candidate, incumbent, strict).promote


def test_deterministic_for_a_seed_and_independent_of_dict_order() -> None:
    incumbent = outcomes({"chat": 60, "code": 70})
    candidate = outcomes({"chat": 66, "code": 72}, offset=3)
    first = decide(candidate, incumbent, PromotionConfig(num_bootstrap=300, seed=7))
    shuffled = dict(reversed(list(candidate.items())))
    again = decide(shuffled, incumbent, PromotionConfig(num_bootstrap=300, seed=7))
    assert first == again
    others = [decide(candidate, incumbent, PromotionConfig(num_bootstrap=300, seed=s)) for s in range(8, 12)]
    assert {o.delta for o in others} == {first.delta}
    assert len({(o.ci_low, o.ci_high) for o in [first, *others]}) > 1  # the seed drives the resampling


def test_plain_tuples_are_accepted() -> None:
    d = decide({"a": ("chat", True), "b": ("chat", True)}, {"a": ("chat", False), "b": ("chat", True)}, FAST)
    assert d.delta == 0.5


def test_different_pair_sets_raise_naming_the_mismatch() -> None:
    incumbent = outcomes({"chat": 5}, num_pairs=10)
    candidate = dict(incumbent)
    del candidate["chat-003"]
    candidate["extra-1"] = PairOutcome("chat", True)
    with pytest.raises(ValueError, match=r"1 pair id\(s\) only in the candidate \['extra-1'\], "
                                         r"1 only in the incumbent \['chat-003'\]"):
        decide(candidate, incumbent, FAST)


def test_category_disagreement_and_empty_sets_raise() -> None:
    with pytest.raises(ValueError, match="pair 'a': 'chat' .candidate. vs 'code' .incumbent."):
        decide({"a": ("chat", True)}, {"a": ("code", True)}, FAST)
    with pytest.raises(ValueError, match="no evaluation pairs"):
        decide({}, {}, FAST)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"confidence": 1.0}, "confidence must be in"),
        ({"confidence": 0.0}, "confidence must be in"),
        ({"num_bootstrap": 10}, "num_bootstrap must be >= 100"),
        ({"num_bootstrap": 500.0}, "num_bootstrap must be an int"),
        ({"category_tolerance": -0.1}, "category_tolerance"),
        ({"seed": "0"}, "seed must be an int"),
    ],
)
def test_config_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PromotionConfig(**kwargs)
