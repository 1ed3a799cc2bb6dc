"""Readers: a file (local or ``s3://``, ``.gz`` decompressed) -> numbered records, for the loaders.

Each reader yields ``(number, unit, record)``: ``number`` is the 1-based line (JSON lines, CSV), item
(JSON arrays) or row (Parquet); ``unit`` is ``None`` for a line, ``"item"`` or ``"row"``; ``record`` is
the object, or a :class:`RecordError` saying why that one record is unreadable (invalid JSON, not UTF-8,
not an object), which the loader raises or counts as a skip. A whole file that cannot be read (a
truncated ``.gz``, a JSON document that does not parse, a JSON array given where JSON lines are read)
raises :class:`~dmoerm.data.records.DataError` naming the file (and the line where known).
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
import zlib
from collections.abc import Iterator
from typing import IO

from dmoerm import storage
from dmoerm.data.records import DataError

GZIP_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)
"""What a truncated or corrupt ``.gz`` raises while being read."""
CSV_FIELD_LIMIT = 1 << 30
"""The csv module's per-field limit while reading (its default, 128 KiB, is smaller than long answers)."""


class RecordError(Exception):
    """A problem with one record; the driver adds file and line."""

    def __init__(self, field_name: str | None, reason: str) -> None:
        super().__init__(reason)
        self.field_name, self.reason = field_name, reason


Record = tuple[int, "str | None", "dict | RecordError"]


@contextlib.contextmanager
def open_binary(uri: str) -> Iterator[IO[bytes]]:
    """The file's bytes, gunzipped when the name ends in ``.gz``."""
    with storage.open_uri(uri, "rb") as raw:
        yield gzip.GzipFile(fileobj=raw) if uri.endswith(".gz") else raw


def read_all(uri: str) -> bytes:
    """The whole (decompressed) content; a truncated or corrupt ``.gz`` is a DataError."""
    with open_binary(uri) as f:
        try:
            return f.read()
        except GZIP_ERRORS as err:
            raise DataError(f"truncated or corrupt gzip file ({err})", path=uri) from None


def decode(data: bytes, uri: str) -> str:
    """UTF-8 text (a leading BOM dropped); an undecodable byte is a DataError naming its line."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(f"not valid UTF-8: byte {data[err.start:err.start + 1]!r} at offset {err.start} "
                        "(re-encode the file as UTF-8)", path=uri, line=line) from None


def _array_hint(fmt: str) -> str:
    return (f"format {fmt!r} reads JSON lines (one object per line), but this file is a JSON array (it starts "
            "with '['): convert it (e.g. jq -c '.[]' FILE > FILE.jsonl), or load it with format 'mapped' "
            "and a field map, which reads JSON arrays")


def read_jsonl(uri: str, fmt: str = "") -> Iterator[Record]:
    """One JSON object per line. A line that is not UTF-8 or not JSON is that record's error."""
    first = True
    n = 0
    with open_binary(uri) as binary:
        try:
            for n, raw in enumerate(binary, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    yield n, None, RecordError(None, f"not valid UTF-8: byte {raw[err.start:err.start + 1]!r} "
                                                     f"at column {err.start + 1}")
                    first = False
                    continue
                if first:
                    line = line.lstrip("\ufeff")
                if not line.strip():
                    continue
                if first and line.lstrip().startswith("["):
                    raise DataError(_array_hint(fmt), path=uri, line=n)
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    hint = " (a pretty-printed JSON document? JSON lines need one object per line)" \
                        if first and line.strip() == "{" else ""
                    yield n, None, RecordError(None, f"invalid JSON: {err}{hint}")
                    first = False
                    continue
                first = False
                yield n, None, obj if isinstance(obj, dict) else RecordError(
                    None, f"expected a JSON object, got {type(obj).__name__}")
        except GZIP_ERRORS as err:
            raise DataError(f"truncated or corrupt gzip file: it ends after line {n} ({err})", path=uri) from None


def resolve_path(obj: object, path: str) -> object:
    """``obj`` at the dotted ``path`` (a key holding the dots itself wins; digits index lists, ``*`` maps
    over a list: ``losers.*.answer``).

    Raises:
        KeyError: a step is missing (the message is the step).
    """
    if not path:
        return obj
    if isinstance(obj, dict) and path in obj:
        return obj[path]
    head, _, rest = path.partition(".")
    if head == "*" and isinstance(obj, list):
        return [resolve_path(item, rest) for item in obj]
    if isinstance(obj, dict) and head in obj:
        return resolve_path(obj[head], rest)
    if isinstance(obj, list) and head.isdigit() and int(head) < len(obj):
        return resolve_path(obj[int(head)], rest)
    raise KeyError(head)


def read_json(uri: str, records: str | None = None) -> Iterator[Record]:
    """A JSON document: an array of objects, or the array at the dotted ``records`` path of an object.
    A ``.json`` file that holds JSON lines instead is read as JSON lines."""
    text = decode(read_all(uri), uri)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data" and not records and text.lstrip().startswith("{"):
            yield from read_jsonl(uri, "mapped")  # JSON lines in a .json file
            return
        raise DataError(f"invalid JSON: {err.msg} (column {err.colno})", path=uri, line=err.lineno) from None
    if records:
        try:
            doc = resolve_path(doc, records)
        except KeyError as err:
            raise DataError(f"no {records!r} in the document (missing {err.args[0]!r})", path=uri,
                            field_name="records") from None
    if not isinstance(doc, list):
        where = f" at {records!r}" if records else ""
        hint = "" if records else " (format 'mapped' reads the list inside an object: map records=<its key>)"
        raise DataError(f"expected a JSON list of records{where}, got {type(doc).__name__}{hint}", path=uri)
    for n, obj in enumerate(doc, start=1):
        yield n, "item", obj if isinstance(obj, dict) else RecordError(
            None, f"expected a JSON object, got {type(obj).__name__}")


def read_csv(uri: str, delimiter: str = ",") -> Iterator[Record]:
    """A CSV (or TSV) file with a header row; each record is numbered by the line it starts on."""
    text = decode(read_all(uri), uri)
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, CSV_FIELD_LIMIT))
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
        if not reader.fieldnames:
            raise DataError("no header row (CSV files need one naming the columns)", path=uri, line=1)
        start = reader.line_num + 1
        try:
            for row in reader:
                if None in row:
                    yield start, None, RecordError(None, f"{len(row[None])} more cells than the header's "
                                                         f"{len(reader.fieldnames)} columns")
                else:
                    yield start, None, row
                start = reader.line_num + 1
        except csv.Error as err:
            raise DataError(f"unreadable CSV: {err}", path=uri, line=start) from None
    finally:
        csv.field_size_limit(limit)


def read_parquet(uri: str) -> Iterator[Record]:
    """A Parquet file, one record per row (nested columns as dicts and lists)."""
    try:
        import pyarrow.parquet as pq  # heavy: only for parquet sources
    except ImportError:
        raise DataError("reading Parquet needs the pyarrow package (pip install pyarrow)", path=uri) from None
    with storage.open_uri(uri, "rb") as f:
        try:
            rows = pq.read_table(f).to_pylist()
        except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
            raise DataError(f"unreadable Parquet file: {err}", path=uri) from None
    for n, obj in enumerate(rows, start=1):
        yield n, "row", obj
