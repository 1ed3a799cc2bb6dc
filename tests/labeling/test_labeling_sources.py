"""Capability labels from rating columns and from a preference dataset's human ranks."""

from __future__ import annotations

import json

import pytest
from conftest import make_sample

from dmoerm.data.records import DataError
from dmoerm.labeling import labels_from_attributes, labels_from_dataset, load_attribute_ratings


def test_ratings_become_pairs_higher_is_better_ties_and_missing_dropped():
    s = make_sample("h1", ["a", "b", "c", "d"], [1, 2, 3, 4])
    other = make_sample("h2", ["a", "b"], [1, 2])
    n = labels_from_attributes([s, other], {
        "h1": {"correctness": [4.0, 2.0, 4.0, None], "verbosity": [1, 3, 2, float("nan")]},
        "missing-sample": {"correctness": [1, 2]},
    })
    assert sorted(s.capability_prefs["correctness"]) == [(0, 1), (2, 1)]  # 0 vs 2 tie dropped, 3 missing
    assert sorted(s.capability_prefs["verbosity"]) == [(1, 0), (1, 2), (2, 0)]
    assert n == 5 and other.capability_prefs == {}


def test_ratings_must_have_one_value_per_response():
    s = make_sample("h1", ["a", "b", "c"], [1, 2, 3])
    with pytest.raises(ValueError, match=r"sample h1: capability 'correctness' has 2 ratings for 3 resp"):
        labels_from_attributes([s], {"h1": {"correctness": [1, 2]}})


def test_load_attribute_ratings_round_trip(tmp_path):
    path = tmp_path / "ratings.jsonl"
    path.write_text(json.dumps({"id": "h1", "ratings": {"coherence": [3, 4.5, None]}}) + "\n\n"
                    + json.dumps({"id": 7, "ratings": {"coherence": [1, 1]}}) + "\n")
    assert load_attribute_ratings(path) == {"h1": {"coherence": [3.0, 4.5, None]},
                                            "7": {"coherence": [1.0, 1.0]}}


@pytest.mark.parametrize("line, where", [
    ("{not json", r"ratings.jsonl:2: invalid JSON"),
    ('{"ratings": {"c": [1, 2]}}', r"ratings.jsonl:2: .*\(field 'id'\)"),
    ('{"id": "b", "ratings": []}', r"ratings.jsonl:2: .*\(field 'ratings'\)"),
    ('{"id": "b", "ratings": {"c": [1, "x"]}}', r"ratings.jsonl:2: .*'x'.*\(field 'ratings.c'\)"),
    ('{"id": "b", "ratings": {"c": [1]}}', r"ratings.jsonl:2: .*\(field 'ratings.c'\)"),
    ('{"id": "a", "ratings": {"c": [1, 2]}}', r"ratings.jsonl:2: duplicate sample id 'a'"),
])
def test_load_attribute_ratings_errors_name_file_line_and_field(tmp_path, line, where):
    path = tmp_path / "ratings.jsonl"
    path.write_text('{"id": "a", "ratings": {"c": [1, 2]}}\n' + line + "\n")
    with pytest.raises(DataError, match=where):
        load_attribute_ratings(path)


def test_dataset_ranks_become_the_capability_labels():
    samples = [make_sample("d1", ["a", "b", "c"], [2, 1, 2]), make_sample("d2", ["a", "b"], [1, 1])]
    n = labels_from_dataset(samples, "harmlessness")
    assert samples[0].capability_prefs == {"harmlessness": [(1, 0), (1, 2)]}  # rank 1 = best, tie dropped
    assert samples[1].capability_prefs == {"harmlessness": []}
    assert n == 2


def test_dataset_source_needs_a_capability_name():
    with pytest.raises(ValueError, match="capability must be a non-empty name"):
        labels_from_dataset([make_sample("d1", ["a", "b"], [1, 2])], "")
