"""A durable on-disk cache of judge answers: a killed labeling job loses no paid judge call.

One SQLite file in WAL mode, one committed row per answered question, keyed by
``(judge model, sha256 of the exact question text, order)``. Abstentions are stored too: they were paid
for. Nothing secret is stored (no API key, no base URL), only the answer text and its token counts.

Durability: rows are committed one by one with ``synchronous=NORMAL``, which survives the process being
killed at any point (the job's failure mode); an operating-system crash may lose the last few commits.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

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


@dataclass(frozen=True)
class CachedAnswer:
    """One stored judge answer."""

    content: str | None
    """The judge's raw reply (``None`` when the reply carried no text); re-parsed on every read."""
    prompt_tokens: int
    """Prompt tokens the judge reported for the call."""
    completion_tokens: int
    """Completion tokens the judge reported for the call."""


class AnswerCache:
    """SQLite store of judge answers. ``path=None`` keeps answers in memory only (nothing survives a crash).

    Use as a context manager, or call :meth:`close`. Not thread-safe: one event loop owns it.
    """

    def __init__(self, path: str | Path | None) -> None:
        self.path = None if path is None else Path(path)
        if self.path is None:
            logger.warning("judge cache_path is None: answers are kept in memory and lost if the job dies")
            self._db = sqlite3.connect(":memory:")
        else:
            if self.path.is_dir():
                raise ValueError(f"judge cache_path {str(self.path)!r} is a directory; give a file path")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path))
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                logger.warning("judge cache %s: journal_mode is %s, not WAL", self.path, mode)
            self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(_SCHEMA)
        self._db.commit()

    def get(self, model: str, question_sha256: str, order: str) -> CachedAnswer | None:
        """The stored answer for one question, or ``None`` when it was never answered."""
        row = self._db.execute(
            "SELECT content, prompt_tokens, completion_tokens FROM answers "
            "WHERE model = ? AND question_sha256 = ? AND question_order = ?",
            (model, question_sha256, order),
        ).fetchone()
        return None if row is None else CachedAnswer(row[0], int(row[1]), int(row[2]))

    def put(self, model: str, question_sha256: str, order: str, answer: CachedAnswer) -> None:
        """Store one answer and commit at once (one transaction per answered question)."""
        self._db.execute(
            "INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?, ?, ?)",
            (model, question_sha256, order, answer.content, answer.prompt_tokens,
             answer.completion_tokens, time.time()),
        )
        self._db.commit()

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0])

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> AnswerCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
