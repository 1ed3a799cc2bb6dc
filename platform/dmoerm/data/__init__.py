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
from dmoerm.data.mapped import formats_help, parse_map
from dmoerm.data.records import DataError, Sample, Turn
from dmoerm.data.splits import SPLITS, SplitConfig, split_samples

__all__ = [
    "FORMATS", "SPLITS", "DataError", "LoadResult", "Sample", "Skip", "SourceConfig", "SplitConfig", "Turn",
    "formats_help", "load_source", "load_sources", "parse_map", "split_samples", "write_samples",
]
