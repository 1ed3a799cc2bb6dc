"""Capability labels taken from a preference dataset's human ranks."""

from __future__ import annotations

from dmoerm.data.records import Sample


def labels_from_dataset(samples: list[Sample], capability: str) -> int:
    """Set ``sample.capability_prefs[capability] = sample.pairs()`` for every sample: the human ranks
    (rank 1 = best, ties excluded) become that capability's labels, e.g. a safety dataset for a
    "harmlessness" capability. Returns the number of ``(better, worse)`` pairs written."""
    if not isinstance(capability, str) or not capability.strip():
        raise ValueError(f"capability must be a non-empty name, got {capability!r}")
    num_pairs = 0
    for s in samples:
        pairs = s.pairs()
        s.capability_prefs[capability] = pairs
        num_pairs += len(pairs)
    return num_pairs
