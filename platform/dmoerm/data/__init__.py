"""Canonical preference records, loaders for public formats, and prompt-disjoint splits."""

from dmoerm.data.loaders import (
    FORMATS,
    LoadResult,
    Skip,
    SourceConfig,
    load_source,
    write_samples,
)
from dmoerm.data.records import DataError, Sample, Turn
from dmoerm.data.splits import SPLITS, SplitConfig, split_samples

__all__ = [
    "FORMATS", "SPLITS", "DataError", "LoadResult", "Sample", "Skip", "SourceConfig", "SplitConfig", "Turn",
    "load_source", "split_samples", "write_samples",
]
