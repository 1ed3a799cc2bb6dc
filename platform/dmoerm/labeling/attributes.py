"""Capability labels from per-response rating columns (e.g. HelpSteer's helpfulness, correctness, ...).

Each capability has one rating per response, **higher is better**; every pair of responses with
different ratings becomes a ``(better, worse)`` label, ties and missing ratings (``None``/NaN) are dropped.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from dmoerm.data.records import DataError, Sample

logger = logging.getLogger(__name__)

Ratings = dict[str, dict[str, list[float | None]]]
"""Sample id -> capability -> one rating per response (higher is better; ``None`` = missing)."""


def pairs_from_ratings(values: list[float | None]) -> list[tuple[int, int]]:
    """``(better, worse)`` index pairs of one rating column; ties and missing ratings dropped."""
    ok = [v is not None and not math.isnan(v) for v in values]
    out: list[tuple[int, int]] = []
    for i in range(len(values)):
        for j in range(i + 1, len(values)):
            if ok[i] and ok[j] and values[i] != values[j]:
                out.append((i, j) if values[i] > values[j] else (j, i))  # type: ignore[operator]
    return out


def labels_from_attributes(samples: list[Sample], ratings: Ratings) -> int:
    """Set ``sample.capability_prefs[cap]`` from the ratings of each sample present in ``ratings``.

    Returns the number of ``(better, worse)`` pairs written. Samples without ratings are left alone.
    """
    by_id = {s.id: s for s in samples}
    num_pairs = 0
    for sample_id, columns in ratings.items():
        s = by_id.get(sample_id)
        if s is None:
            continue
        for cap, values in columns.items():
            if len(values) != len(s.responses):
                raise ValueError(f"sample {sample_id}: capability {cap!r} has {len(values)} ratings for "
                                 f"{len(s.responses)} responses (one rating per response, in order)")
            pairs = pairs_from_ratings(values)
            s.capability_prefs[cap] = pairs
            num_pairs += len(pairs)
    unmatched = len(set(ratings) - set(by_id))
    if unmatched:
        logger.warning("%d rated sample ids match no sample (e.g. %r)", unmatched,
                       next(iter(set(ratings) - set(by_id))))
    return num_pairs


def load_attribute_ratings(path: str | Path) -> Ratings:
    """Read a jsonl of ``{"id": ..., "ratings": {"capability": [one number or null per response]}}``.

    Raises :class:`~dmoerm.data.records.DataError` naming the file, the line and the field.
    """
    path = Path(path)
    out: Ratings = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = {"path": str(path), "line": lineno}
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"invalid JSON: {e.msg}", **where) from e
            if not isinstance(obj, dict):
                raise DataError("each line must be a JSON object", **where)
            sample_id = obj.get("id")
            if not isinstance(sample_id, (str, int)) or isinstance(sample_id, bool):
                raise DataError("missing or non-string sample id", **where, field_name="id")
            sample_id = str(sample_id)
            if sample_id in out:
                raise DataError(f"duplicate sample id {sample_id!r}", **where, field_name="id")
            columns = obj.get("ratings")
            if not isinstance(columns, dict) or not columns:
                raise DataError("'ratings' must be a non-empty object of capability -> list of numbers",
                                **where, field_name="ratings")
            parsed: dict[str, list[float | None]] = {}
            for cap, values in columns.items():
                name = f"ratings.{cap}"
                if not isinstance(values, list) or len(values) < 2:
                    raise DataError("must be a list with one rating per response (at least two)", **where,
                                    field_name=name)
                for v in values:
                    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                        raise DataError(f"ratings must be numbers or null, got {v!r}", **where,
                                        field_name=name)
                parsed[cap] = [None if v is None else float(v) for v in values]
            out[sample_id] = parsed
    return out
