"""Canonical preference records, loaders for public formats, and prompt-disjoint splits."""

from dmoerm.data.loaders import (
    FORMATS,
    LoadResult,
    Skip,
    SourceConfig,
    load_source,
    load_sources,
    write_samples,
)
from dmoerm.data.records import DataError, Sample, Turn, iter_pairs
from dmoerm.data.splits import SPLITS, SplitConfig, split_samples

__all__ = [
    "FORMATS", "SPLITS", "DataError", "LoadResult", "Sample", "Skip", "SourceConfig", "SplitConfig", "Turn",
    "iter_pairs", "load_source", "load_sources", "split_samples", "write_samples",
]
