"""The shared paired bootstrap: resamples samples (clusters of pairs), covers a known difference."""

import random

import pytest

from dmoerm.promotion import PromotionConfig, decide
from dmoerm.significance import paired_bootstrap, sample_of


def test_sample_of_reads_the_pair_id():
    assert sample_of("hh-3#0>2") == "hh-3"
    assert sample_of("a#b#1>0") == "a#b"
    assert sample_of("plain") == "plain"


def _clustered(num_samples: int, pairs_per_sample: int, seed: int):
    """Every pair of a sample has the same outcome (one conversation, one judgement): the worst case for
    a bootstrap that treats the pairs as independent."""
    rng = random.Random(seed)
    cand, inc, cand1, inc1 = {}, {}, {}, {}
    for s in range(num_samples):
        c, i = rng.random() < 0.6, rng.random() < 0.5
        cand1[f"s{s}#0>1"], inc1[f"s{s}#0>1"] = c, i
        for p in range(pairs_per_sample):
            cand[f"s{s}#{p}>{p + 1}"], inc[f"s{s}#{p}>{p + 1}"] = c, i
    return cand, inc, cand1, inc1


def test_copies_of_a_pair_within_a_sample_add_no_certainty():
    cand, inc, cand1, inc1 = _clustered(60, 6, seed=1)
    many = paired_bootstrap(cand, inc, num_bootstrap=1000, seed=3)
    one = paired_bootstrap(cand1, inc1, num_bootstrap=1000, seed=3)
    assert (many.num_pairs, many.num_samples) == (360, 60)
    # Six identical pairs per sample carry the information of one: the same interval, not sqrt(6) narrower.
    assert (many.delta, many.low, many.high) == pytest.approx((one.delta, one.low, one.high), abs=1e-12)


def test_interval_covers_a_known_difference():
    """Models correct with probability 0.70 and 0.60 on independent samples of 1-6 pairs: the 90% interval
    covers the true +0.10 in about 90% of repetitions."""
    rng, covered, reps = random.Random(0), 0, 120
    for rep in range(reps):
        cand, inc = {}, {}
        for s in range(150):
            c, i = rng.random() < 0.7, rng.random() < 0.6
            for p in range(rng.randint(1, 6)):
                cand[f"s{s}#{p}>9"], inc[f"s{s}#{p}>9"] = c, i
        iv = paired_bootstrap(cand, inc, confidence=0.9, num_bootstrap=400, seed=rep)
        covered += iv.low <= 0.10 <= iv.high
    assert 0.8 <= covered / reps <= 0.98


def test_promotion_uses_the_sample_level_interval():
    """Ten samples, each six identical pairs, the candidate right on 8 and the incumbent on 5: resampling the
    60 pairs as if independent gives an interval above 0 and promotes; ten samples do not support it."""
    cand = {f"s{s}#{p}>9": ("c", s < 8) for s in range(10) for p in range(6)}
    inc = {f"s{s}#{p}>9": ("c", s < 5) for s in range(10) for p in range(6)}
    d = decide(cand, inc, PromotionConfig(num_bootstrap=2000, seed=0, category_tolerance=1.0))
    assert d.delta == pytest.approx(0.3)
    assert not d.promote and d.ci_low <= 0.0
    assert "of 10 samples" in d.reason


def test_mismatched_pairs_are_named():
    with pytest.raises(ValueError, match="same pairs.*only in the candidate"):
        paired_bootstrap({"a#0>1": True}, {"b#0>1": True})
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap({"a#0>1": True}, {"a#0>1": True}, confidence=1.5)
