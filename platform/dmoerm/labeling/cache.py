"""The judge's answer cache, keyed by the question: a killed, resized or re-run labeling job never pays twice.

The shared, durable truth is a folder of content-addressed answer objects on storage (a local path or
``s3://``, through :mod:`dmoerm.storage`), one small JSON object per answered question::

    <cache_uri>/<model dir>/<sha[:2]>/<sha>-<order>.json

where ``sha`` is the sha256 of the exact question text (conversation, both responses, capability and its
description: :func:`dmoerm.labeling.prompts.question_sha256`) and ``order`` is ``ab`` or ``ba``. An
object is written as soon as its answer is paid for (atomically: a killed writer leaves nothing
half-written) and never changes afterwards, so any number of workers on any number of nodes write
without coordination and read everything. Which worker or shard asked a question plays no part, so
resizing the cluster or adding samples re-asks nothing. Abstentions are stored too: they were paid for.
Nothing secret is stored (no API key, no base URL), only the answer text and its token counts.

On remote storage a local SQLite file (``$DMOERM_LOCAL_CACHE/judge-cache/``, else the temp folder) mirrors
the answers this node has seen, so a re-run on the same node reads no object twice; it is only ever a copy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sqlite3
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from dmoerm import storage

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    model TEXT NOT NULL,
    question_sha256 TEXT NOT NULL,
    question_order TEXT NOT NULL,
    content TEXT,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (model, question_sha256, question_order)
)
"""
_OBJECT_RE = re.compile(r"([0-9a-f]{64})-(ab|ba)\.json$")
Key = tuple[str, str]  # (question sha256, order)


@dataclass(frozen=True)
class CachedAnswer:
    """One stored judge answer."""

    content: str | None
    """The judge's raw reply (``None`` when the reply carried no text); re-parsed on every read."""
    prompt_tokens: int
    """Prompt tokens the judge reported for the call."""
    completion_tokens: int
    """Completion tokens the judge reported for the call."""


def model_dir(model: str) -> str:
    """A path-safe folder name for a judge model (``meta-llama/Llama-3`` -> ``meta-llama_Llama-3-1a2b3c4d``)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", model).strip(".")[:80] or "model"
    return f"{safe}-{hashlib.sha256(model.encode('utf-8')).hexdigest()[:8]}"


def answer_uri(cache_uri: str, model: str, question_sha256: str, order: str) -> str:
    """Where one answer object lives."""
    return storage.join_uri(cache_uri, model_dir(model), question_sha256[:2], f"{question_sha256}-{order}.json")


def _default_local_path(cache_uri: str) -> Path:
    root = Path(os.environ.get("DMOERM_LOCAL_CACHE") or Path(tempfile.gettempdir()) / "dmoerm-stage-cache")
    return root / "judge-cache" / f"{hashlib.sha256(cache_uri.encode('utf-8')).hexdigest()[:16]}.sqlite"


class AnswerCache:
    """Answers by question on storage; ``uri=None`` keeps them in memory only (nothing survives a crash).

    ``local_path`` is the SQLite mirror used with remote storage (default: under ``$DMOERM_LOCAL_CACHE``).
    Use as a context manager, or call :meth:`close`. Not thread-safe: one event loop owns it.
    """

    def __init__(self, uri: str | None, *, local_path: str | Path | None = None,
                 endpoint_url: str | None = None) -> None:
        self.uri = None if uri is None else str(uri).rstrip("/")
        self.endpoint_url = endpoint_url
        self.num_objects_read = 0
        """Answer objects read from storage so far (hits the local mirror did not have)."""
        if self.uri is None:
            logger.warning("judge cache is None: answers are kept in memory and lost if the job dies")
            self._db = sqlite3.connect(":memory:")
        else:
            if not storage.is_s3(self.uri) and os.path.isfile(self.uri):
                raise ValueError(
                    f"judge cache_path {self.uri!r} is a file (the old one-SQLite-file cache?): cache_path is now "
                    f"a folder (local or s3://) of answer objects. Import the old answers with "
                    f"dmoerm.labeling.cache.import_sqlite({self.uri!r}, NEW_FOLDER) and point cache_path there")
            mirror = (Path(local_path) if local_path is not None
                      else _default_local_path(self.uri) if storage.is_s3(self.uri) else None)
            if mirror is None:  # local storage is fast already: the objects are the only copy
                self._db = sqlite3.connect(":memory:")
            else:
                mirror.parent.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(str(mirror), timeout=60)  # shared by this node's workers
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(_SCHEMA)
        self._db.commit()

    # ---- reading -----------------------------------------------------------------------------
    def _local_get(self, model: str, key: Key) -> CachedAnswer | None:
        row = self._db.execute(
            "SELECT content, prompt_tokens, completion_tokens FROM answers "
            "WHERE model = ? AND question_sha256 = ? AND question_order = ?", (model, *key)).fetchone()
        return None if row is None else CachedAnswer(row[0], int(row[1]), int(row[2]))

    def get(self, model: str, question_sha256: str, order: str) -> CachedAnswer | None:
        """The stored answer for one question, or ``None`` when it was never answered."""
        return self.get_many(model, [(question_sha256, order)]).get((question_sha256, order))

    def get_many(self, model: str, keys: list[Key]) -> dict[Key, CachedAnswer]:
        """Every stored answer among ``keys``: the local mirror first, then one listing of the model's
        folder on storage and one read per answer the mirror lacks."""
        found = {k: a for k in keys if (a := self._local_get(model, k)) is not None}
        missing = [k for k in keys if k not in found]
        if not missing or self.uri is None:
            return found
        listed: set[Key] = set()
        for uri in storage.list_uris(storage.join_uri(self.uri, model_dir(model)), endpoint_url=self.endpoint_url):
            m = _OBJECT_RE.search(uri)
            if m:
                listed.add((m.group(1), m.group(2)))
        for key in missing:
            if key not in listed:
                continue
            answer = self._read_object(model, key)
            if answer is not None:
                found[key] = answer
                self._local_put(model, key, answer)
        self._db.commit()
        return found

    def _read_object(self, model: str, key: Key) -> CachedAnswer | None:
        uri = answer_uri(self.uri, model, *key)  # type: ignore[arg-type]
        try:
            obj = json.loads(storage.read_bytes(uri, endpoint_url=self.endpoint_url))
            if obj.get("model") != model or obj.get("question_sha256") != key[0] or obj.get("order") != key[1]:
                raise ValueError("its model/question_sha256/order do not match its name")
            answer = CachedAnswer(obj["content"], int(obj["prompt_tokens"]), int(obj["completion_tokens"]))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            logger.warning("judge cache object %s is unreadable (%s): the question will be asked again", uri, e)
            return None
        self.num_objects_read += 1
        return answer

    # ---- writing -----------------------------------------------------------------------------
    def _local_put(self, model: str, key: Key, answer: CachedAnswer) -> None:
        self._db.execute("INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?, ?, ?)",
                         (model, *key, answer.content, answer.prompt_tokens, answer.completion_tokens, time.time()))

    def put(self, model: str, question_sha256: str, order: str, answer: CachedAnswer) -> None:
        """Store one answer at once: its object on storage first (the truth), then the local mirror."""
        if self.uri is not None:
            obj = {"model": model, "question_sha256": question_sha256, "order": order, "content": answer.content,
                   "prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
                   "created_at": time.time()}
            storage.write_bytes(answer_uri(self.uri, model, question_sha256, order),
                                json.dumps(obj, ensure_ascii=False).encode("utf-8"), endpoint_url=self.endpoint_url)
        self._local_put(model, (question_sha256, order), answer)
        self._db.commit()

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> AnswerCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def count_answers(cache_uri: str, model: str | None = None, *, endpoint_url: str | None = None) -> int:
    """Answer objects stored under ``cache_uri`` (of one judge ``model``, or of all)."""
    base = cache_uri if model is None else storage.join_uri(cache_uri, model_dir(model))
    return sum(1 for u in storage.list_uris(base, endpoint_url=endpoint_url) if _OBJECT_RE.search(u))


def import_sqlite(sqlite_path: str | Path, cache_uri: str, *, endpoint_url: str | None = None) -> int:
    """Copy the answers of an old one-file SQLite cache (earlier ``cache_path`` files, including the Ray
    job's ``<cache_path>.<i>-of-<n>`` shards) into the answer objects at ``cache_uri``; the count copied."""
    src = sqlite3.connect(f"file:{Path(sqlite_path)}?mode=ro", uri=True)
    try:
        rows = src.execute("SELECT model, question_sha256, question_order, content, prompt_tokens, "
                           "completion_tokens FROM answers").fetchall()
    finally:
        src.close()
    with AnswerCache(cache_uri, endpoint_url=endpoint_url) as cache:
        for model, sha, order, content, p, c in rows:
            cache.put(model, sha, order, CachedAnswer(content, int(p), int(c)))
    logger.info("imported %d judge answers from %s into %s", len(rows), sqlite_path, cache_uri)
    return len(rows)
