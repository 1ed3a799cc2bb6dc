"""Prompt-disjoint, deterministic, stratified splits, on the real hh-rlhf test sets."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from dmoerm.data import SPLITS, Sample, SourceConfig, SplitConfig, Turn, load_source, split_samples


@pytest.fixture(scope="module")
def hh(shared_data) -> list[Sample]:
    samples: list[Sample] = []
    for split in ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled"):
        cfg = SourceConfig(str(shared_data / "hh-rlhf" / split / "test.jsonl.gz"), "hh",
                           category="harmless" if split.startswith("harmless") else "helpful")
        samples += load_source(cfg).samples
    return samples


def _ids(splits: dict[str, list[Sample]]) -> dict[str, list[str]]:
    return {k: [s.id for s in v] for k, v in splits.items()}


def test_disjoint_by_prompt_with_real_duplicates(hh):
    counts = Counter(s.prompt_key for s in hh)
    assert any(n > 1 for n in counts.values()), "hh-rlhf has repeated prompts: the test relies on them"
    splits = split_samples(hh, SplitConfig())
    assert set(splits) == set(SPLITS) and sum(map(len, splits.values())) == len(hh)
    where: dict[str, str] = {}
    for name, samples in splits.items():
        for s in samples:
            assert where.setdefault(s.prompt_key, name) == name, "a prompt landed in two splits"


def test_fractions_respected_per_category(hh):
    cfg = SplitConfig(phase1=0.5, phase3=0.3, val=0.1, test=0.1)
    splits = split_samples(hh, cfg)
    for category in ("harmless", "helpful"):
        total = sum(s.category == category for s in hh)
        for name, frac in cfg.fractions().items():
            got = sum(s.category == category for s in splits[name]) / total
            assert abs(got - frac) < 0.02, (category, name, got, frac)


def test_deterministic_order_independent_and_seeded(hh):
    base = _ids(split_samples(hh, SplitConfig(seed=7)))
    shuffled = list(hh)
    random.Random(0).shuffle(shuffled)
    assert _ids(split_samples(shuffled, SplitConfig(seed=7))) == base
    other = _ids(split_samples(hh, SplitConfig(seed=8)))
    assert set(other["test"]) != set(base["test"])
    assert base["phase1"] != [s.id for s in hh][: len(base["phase1"])]  # not the head of the file


def test_small_strata_and_unknown_category():
    def sample(i: int, category: str | None) -> Sample:
        return Sample(f"s:{i}", [Turn("user", f"q{i}")], ["a", "b"], [1, 2], category=category)

    samples = [sample(i, "rare") for i in range(10)] + [sample(i, None) for i in range(10, 110)]
    splits = split_samples(samples, SplitConfig(phase1=0.6, phase3=0.2, val=0.1, test=0.1))
    assert [sum(s.category == "rare" for s in splits[k]) for k in SPLITS] == [6, 2, 1, 1]
    assert [sum(s.category is None for s in splits[k]) for k in SPLITS] == [60, 20, 10, 10]


def test_zero_fraction_split_is_empty():
    samples = [Sample(f"s:{i}", [Turn("user", f"q{i}")], ["a", "b"], [1, 2]) for i in range(20)]
    splits = split_samples(samples, SplitConfig(phase1=0.8, phase3=0.0, val=0.2, test=0.0))
    assert len(splits["phase1"]) == 16 and splits["phase3"] == [] and splits["test"] == []


@pytest.mark.parametrize("kwargs, match", [
    ({"phase1": 0.7}, "sum to 1"),
    ({"phase1": -0.1, "phase3": 0.9}, "phase1"),
    ({"val": float("nan")}, "val"),
    ({"seed": "0"}, "seed"),
])
def test_split_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SplitConfig(**kwargs)
