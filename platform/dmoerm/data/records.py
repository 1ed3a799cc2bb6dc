"""The one canonical record every loader produces and every stage consumes.

Rank semantics are explicit and tested end to end: **rank 1 is the best response**; a larger rank is a
worse response; equal ranks are a tie and carry no preference.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Literal

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")


class DataError(ValueError):
    """Malformed input. The message names the file, the line (1-based) and the field."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None,
                 field_name: str | None = None) -> None:
        where = ":".join(str(p) for p in (path, line) if p is not None)
        prefix = f"{where}: " if where else ""
        suffix = f" (field {field_name!r})" if field_name else ""
        super().__init__(f"{prefix}{message}{suffix}")
        self.path, self.line, self.field_name = path, line, field_name


@dataclass(frozen=True)
class Turn:
    role: Role
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"turn role must be one of {ROLES}, got {self.role!r}")
        if not isinstance(self.content, str):
            raise ValueError(f"turn content must be a string, got {type(self.content).__name__}")


@dataclass
class Sample:
    """A conversation context, two or more candidate responses and their human ranks.

    Attributes:
        id: stable source id (e.g. ``"hh-rlhf/harmless-base:17"``), unique within a dataset.
        context: the conversation turns before the responses (at least one).
        responses: candidate final assistant turns (at least two).
        ranks: one per response; 1 = best, ties allowed.
        category: task category (router class) when known.
        capability_prefs: capability name -> list of ``(better_index, worse_index)`` response pairs.
        source: where the record came from (dataset name or file).
    """

    id: str
    context: list[Turn]
    responses: list[str]
    ranks: list[int]
    category: str | None = None
    capability_prefs: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    source: str = ""

    def __post_init__(self) -> None:
        if not self.context:
            raise ValueError(f"sample {self.id}: context must hold at least one turn")
        if len(self.responses) < 2:
            raise ValueError(f"sample {self.id}: needs at least two responses, got {len(self.responses)}")
        if len(self.ranks) != len(self.responses):
            raise ValueError(f"sample {self.id}: {len(self.ranks)} ranks for {len(self.responses)} responses")
        for r in self.ranks:
            if isinstance(r, bool) or not isinstance(r, int) or r < 1:
                raise ValueError(f"sample {self.id}: ranks must be integers >= 1 (1 = best), got {self.ranks}")
        n = len(self.responses)
        for cap, pairs in self.capability_prefs.items():
            for b, w in pairs:
                if not (0 <= b < n and 0 <= w < n) or b == w:
                    raise ValueError(f"sample {self.id}: capability {cap!r} pair {(b, w)} out of range")

    def pairs(self) -> list[tuple[int, int]]:
        """All ``(better, worse)`` index pairs with different ranks; ties are excluded."""
        n = len(self.ranks)
        return [(i, j) if self.ranks[i] < self.ranks[j] else (j, i)
                for i in range(n) for j in range(i + 1, n) if self.ranks[i] != self.ranks[j]]

    @property
    def prompt_key(self) -> str:
        """A hash of the context alone: samples sharing it go to the same split."""
        text = json.dumps([[t.role, t.content.strip()] for t in self.context], ensure_ascii=False)
        return hashlib.sha1(text.encode("utf-8")).hexdigest()

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "context": [{"role": t.role, "content": t.content} for t in self.context],
            "responses": list(self.responses),
            "ranks": list(self.ranks),
            "category": self.category,
            "capability_prefs": {k: [list(p) for p in v] for k, v in self.capability_prefs.items()},
            "source": self.source,
        }

    @classmethod
    def from_json(cls, obj: dict) -> Sample:
        return cls(
            id=str(obj["id"]),
            context=[Turn(t["role"], t["content"]) for t in obj["context"]],
            responses=list(obj["responses"]),
            ranks=[int(r) for r in obj["ranks"]],
            category=obj.get("category"),
            capability_prefs={k: [(int(b), int(w)) for b, w in v]
                              for k, v in (obj.get("capability_prefs") or {}).items()},
            source=obj.get("source", ""),
        )
