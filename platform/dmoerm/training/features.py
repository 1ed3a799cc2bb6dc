"""Frozen-trunk features shared by every phase, expert and category, as one interface with two policies.

Every phase reads the trunk hidden states of its (context, response) rows through ``TrunkFeatures``:
``row(context, response)`` gives a row id, ``lengths()`` the rows' token counts (for length-bucketed
batches), ``collate(rows)`` a right-padded ``(N, T, H)`` float32 batch and its ``(N, T)`` mask, so only the
top blocks run per step. Three implementations:

- ``TrunkCache``: every row in memory (built in process; tests, benches, small data).
- ``CachedTrunk``: the rows written once by ``TrunkShardWriter`` into safetensors shards of about
  ``shard_bytes`` each plus an ``index.json`` (row key -> shard, length); a batch reads only its rows, from
  at most ``max_open_shards`` open shards (least recently used closed first), and ``fetch`` maps a file
  name to a local path, so on S3 only the shards a batch needs are downloaded. Never whole in memory.
- ``RecomputedTrunk``: keeps only the token ids and runs the trunk on each batch under no_grad.

``choose_trunk_policy`` picks between the last two from ``estimate_trunk_bytes`` (rows x mean tokens x
H x bytes per value) and a budget. Both store/return values rounded to one precision (``dtype``), so
a model trained on either sees the same features. The router's context features are
``dmoerm.modeling.router.context_features`` (the same function scoring uses).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from tqdm.auto import tqdm

from dmoerm.data.records import Sample, Turn
from dmoerm.modeling.backbone import Backbone, TokenRow, length_batches

logger = logging.getLogger(__name__)

INDEX = "index.json"
"""The shard index of a ``CachedTrunk`` folder."""
TrunkPolicy = Literal["cached", "recompute"]
Rows = list[tuple[Sequence[Turn], str]]


def row_key(context: Sequence[Turn], response: str | None) -> str:
    blob = json.dumps([[[t.role, t.content] for t in context], response], ensure_ascii=False)
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()


def sample_rows(samples: Iterable[Sample]) -> Rows:
    """Every (context, response) row of ``samples``."""
    return [(s.context, r) for s in samples for r in s.responses]


class TrunkFeatures(Protocol):
    """What a phase needs of the trunk states of its rows."""

    def __len__(self) -> int: ...

    def row(self, context: Sequence[Turn], response: str) -> int:
        """The id of a (context, response) row."""

    def lengths(self) -> list[int]:
        """Tokens of each row, by id."""

    def tensor(self, r: int) -> torch.Tensor:
        """Row ``r``'s (T_r, H) float32 states."""

    def collate(self, rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Row ids -> right-padded hidden (N, T, H) float32 (zeros past each row) and mask (N, T)."""


class _RowView(Sequence[torch.Tensor]):
    """``features.rows[r]``: row ``r``'s (T_r, H) states, read (or computed) on access."""

    def __init__(self, features: TrunkFeatures) -> None:
        self._features = features

    def __len__(self) -> int:
        return len(self._features)

    def __getitem__(self, r: int) -> torch.Tensor:  # type: ignore[override]
        return self._features.tensor(r)


def _stack(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(T_i, H) tensors -> right-padded (N, T, H) float32 and mask (N, T)."""
    width = max(t.size(0) for t in tensors)
    hidden = torch.zeros(len(tensors), width, tensors[0].size(1), device=tensors[0].device)
    mask = torch.zeros(len(tensors), width, dtype=torch.long, device=tensors[0].device)
    for i, t in enumerate(tensors):
        hidden[i, : t.size(0)] = t.float()
        mask[i, : t.size(0)] = 1
    return hidden, mask


def _new_rows(rows: Rows, known: Callable[[str], bool]) -> dict[str, tuple[Sequence[Turn], str]]:
    todo: dict[str, tuple[Sequence[Turn], str]] = {}
    for ctx, resp in rows:
        key = row_key(ctx, resp)
        if not known(key) and key not in todo:
            todo[key] = (ctx, resp)
    return todo


def _trunk_pass(backbone: Backbone, tokens: list[TokenRow], batch_size: int, dtype: torch.dtype,
                progress: bool):
    """(index into ``tokens``, its (T_i, H) CPU states in ``dtype``) for every row, in length-sorted
    batches (the least padding); the caller decides what to keep."""
    bar = tqdm(total=len(tokens), desc="trunk features", unit="row", disable=not progress, leave=False)
    for batch in length_batches([len(t.ids) for t in tokens], batch_size):
        hidden = backbone.trunk(backbone.pad([tokens[j] for j in batch]))  # (B, T, H)
        for i, j in enumerate(batch):
            yield j, hidden[i, : len(tokens[j].ids)].to("cpu", dtype, copy=True)  # (T_i, H)
        bar.update(len(batch))
    bar.close()


class TrunkCache:
    """Trunk hidden states of (context, response) rows, each stored in memory as a (T_i, H) tensor."""

    def __init__(self, backbone: Backbone, batch_size: int = 32, dtype: torch.dtype = torch.float32) -> None:
        self.backbone, self.batch_size, self.dtype = backbone, batch_size, dtype
        self.rows: list[torch.Tensor] = []
        self.index: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def add_samples(self, samples: Iterable[Sample], progress: bool = True) -> None:
        self.add_rows(sample_rows(samples), progress=progress)

    def add_rows(self, rows: Rows, progress: bool = True) -> None:
        keys = list(todo := _new_rows(rows, self.index.__contains__))
        if not keys:
            return
        tokens = self.backbone.tokenize([todo[k][0] for k in keys], [todo[k][1] for k in keys])
        start = len(self.rows)
        self.rows.extend([torch.empty(0)] * len(keys))
        for j, k in enumerate(keys):
            self.index[k] = start + j
        for j, t in _trunk_pass(self.backbone, tokens, self.batch_size, self.dtype, progress):
            self.rows[start + j] = t

    def row(self, context: Sequence[Turn], response: str) -> int:
        return self.index[row_key(context, response)]

    def lengths(self) -> list[int]:
        return [r.size(0) for r in self.rows]

    def tensor(self, r: int) -> torch.Tensor:
        return self.rows[r].float()

    def collate(self, rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Row ids -> right-padded hidden (N, T, H) float32 and attention mask (N, T)."""
        return _stack([self.rows[r] for r in rows])


# ---- the cached policy: shards on disk / S3 ----------------------------------------------------------
class TrunkShardWriter:
    """Computes rows' trunk states once and writes them to ``folder`` as ``shards/NNNNN.safetensors`` of
    about ``shard_bytes`` each (one tensor per row, named by its row key), then ``index.json``. Holds at
    most one shard and one batch in memory; ``on_shard(path)`` is called as each shard is closed."""

    def __init__(self, backbone: Backbone, folder: Path, *, dtype: torch.dtype = torch.float32,
                 shard_bytes: int = 256 << 20, batch_size: int = 32,
                 on_shard: Callable[[Path], None] | None = None) -> None:
        if shard_bytes < 1:
            raise ValueError(f"shard_bytes must be >= 1, got {shard_bytes}")
        self.backbone, self.folder, self.dtype = backbone, Path(folder), dtype
        self.shard_bytes, self.batch_size, self.on_shard = shard_bytes, batch_size, on_shard
        self.rows: dict[str, list[int]] = {}  # row key -> [shard, length]
        self.shards: list[str] = []
        self.bytes_written = 0
        self.peak_buffer_bytes = 0
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffered = 0

    def add_samples(self, samples: Iterable[Sample], progress: bool = True) -> None:
        self.add_rows(sample_rows(samples), progress=progress)

    def add_rows(self, rows: Rows, progress: bool = True) -> None:
        """Rows not written yet, computed in length-sorted batches (call once per group of rows a phase
        reads together, e.g. a split, so that group's rows share shards)."""
        keys = list(todo := _new_rows(rows, self.rows.__contains__))
        if not keys:
            return
        tokens = self.backbone.tokenize([todo[k][0] for k in keys], [todo[k][1] for k in keys])
        for j, t in _trunk_pass(self.backbone, tokens, self.batch_size, self.dtype, progress):
            self.rows[keys[j]] = [len(self.shards), t.size(0)]
            self._buffer[keys[j]] = t
            self._buffered += t.numel() * t.element_size()
            self.peak_buffer_bytes = max(self.peak_buffer_bytes, self._buffered)
            if self._buffered >= self.shard_bytes:
                self._flush()

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self._buffer:
            return
        name = f"shards/{len(self.shards):05d}.safetensors"
        path = self.folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(self._buffer, str(path))
        self.shards.append(name)
        self.bytes_written += self._buffered
        self._buffer, self._buffered = {}, 0
        if self.on_shard is not None:
            self.on_shard(path)

    def close(self) -> dict[str, Any]:
        """Write the last shard and the index; a summary (rows, shards, bytes)."""
        self._flush()
        index = {"format": 1, "dtype": str(self.dtype).removeprefix("torch."),
                 "hidden_size": self.backbone.hidden_size, "shards": self.shards, "rows": self.rows}
        (self.folder / INDEX).write_text(json.dumps(index))
        return {"rows": len(self.rows), "shards": len(self.shards), "bytes": self.bytes_written}


@dataclass
class ShardStats:
    """What a ``CachedTrunk`` has read: for tests and logs."""

    shards_fetched: set[str] = field(default_factory=set)
    """Shard files opened at least once (on S3: downloaded)."""
    max_open: int = 0
    """Most shards open at the same time."""
    bytes_read: int = 0
    """Row bytes read so far, all batches together."""
    max_batch_bytes: int = 0
    """Most row bytes one ``collate`` read."""


class CachedTrunk:
    """The rows ``keys`` (default: all) of a ``TrunkShardWriter`` folder, read per batch.

    ``fetch(name)`` returns a local path for a file of the folder (``index.json``, ``shards/...``),
    downloading it first where the folder is remote; shards are fetched when a batch first needs them.
    """

    def __init__(self, fetch: Callable[[str], Path] | str | Path, keys: Iterable[str] | None = None,
                 max_open_shards: int = 4) -> None:
        if not callable(fetch):
            folder = Path(fetch)
            fetch = folder.joinpath
        if max_open_shards < 1:
            raise ValueError(f"max_open_shards must be >= 1, got {max_open_shards}")
        self._fetch, self.max_open_shards = fetch, max_open_shards
        index_path = fetch(INDEX)
        if not Path(index_path).exists():
            raise FileNotFoundError(f"no trunk cache index at {index_path}")
        index = json.loads(Path(index_path).read_text())
        self.shards: list[str] = index["shards"]
        self.hidden_size: int = index["hidden_size"]
        stored: dict[str, list[int]] = index["rows"]
        wanted = list(stored) if keys is None else list(dict.fromkeys(keys))
        missing = [k for k in wanted if k not in stored]
        if missing:
            raise KeyError(f"trunk cache {index_path} lacks {len(missing)} of the {len(wanted)} rows asked for "
                           f"(first: {missing[0]}); it was built for other data")
        self.index = {k: i for i, k in enumerate(wanted)}
        self._keys = wanted
        self._where = [stored[k] for k in wanted]  # row id -> [shard, length]
        self._open: OrderedDict[int, Any] = OrderedDict()
        self.stats = ShardStats()
        self.rows = _RowView(self)

    def __len__(self) -> int:
        return len(self._keys)

    def row(self, context: Sequence[Turn], response: str) -> int:
        return self.index[row_key(context, response)]

    def lengths(self) -> list[int]:
        return [n for _, n in self._where]

    def _shard(self, s: int) -> Any:
        from safetensors import safe_open

        if s in self._open:
            self._open.move_to_end(s)
            return self._open[s]
        while len(self._open) >= self.max_open_shards:
            _, old = self._open.popitem(last=False)
            old.__exit__(None, None, None)
        handle = safe_open(str(self._fetch(self.shards[s])), framework="pt")
        self._open[s] = handle
        self.stats.shards_fetched.add(self.shards[s])
        self.stats.max_open = max(self.stats.max_open, len(self._open))
        return handle

    def _read(self, rows: Sequence[int]) -> list[torch.Tensor]:
        out: dict[int, torch.Tensor] = {}
        for r in sorted(set(rows), key=lambda r: self._where[r][0]):  # shard by shard
            out[r] = self._shard(self._where[r][0]).get_tensor(self._keys[r])
        nbytes = sum(t.numel() * t.element_size() for t in out.values())
        self.stats.bytes_read += nbytes
        self.stats.max_batch_bytes = max(self.stats.max_batch_bytes, nbytes)
        return [out[r] for r in rows]

    def tensor(self, r: int) -> torch.Tensor:
        return self._read([r])[0].float()

    def collate(self, rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Row ids -> right-padded hidden (N, T, H) float32 and attention mask (N, T)."""
        return _stack(self._read(rows))

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].__exit__(None, None, None)


# ---- the recomputed policy ---------------------------------------------------------------------------
class RecomputedTrunk:
    """Rows kept as token ids; ``collate`` runs the frozen trunk on the batch (no_grad), rounded to
    ``dtype`` like a cache stored in it, with zeros past each row like a collated cache."""

    def __init__(self, backbone: Backbone, dtype: torch.dtype = torch.float32) -> None:
        self.backbone, self.dtype = backbone, dtype
        self.tokens: list[TokenRow] = []
        self.index: dict[str, int] = {}
        self.rows = _RowView(self)

    def __len__(self) -> int:
        return len(self.tokens)

    def add_samples(self, samples: Iterable[Sample]) -> RecomputedTrunk:
        return self.add_rows(sample_rows(samples))

    def add_rows(self, rows: Rows) -> RecomputedTrunk:
        keys = list(todo := _new_rows(rows, self.index.__contains__))
        if not keys:
            return self
        for k, t in zip(keys, self.backbone.tokenize([todo[k][0] for k in keys], [todo[k][1] for k in keys])):
            self.index[k] = len(self.tokens)
            self.tokens.append(t)
        return self

    def row(self, context: Sequence[Turn], response: str) -> int:
        return self.index[row_key(context, response)]

    def lengths(self) -> list[int]:
        return [len(t.ids) for t in self.tokens]

    def tensor(self, r: int) -> torch.Tensor:
        return self.collate([r])[0][0]

    @torch.no_grad()
    def collate(self, rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Row ids -> right-padded hidden (N, T, H) float32 and attention mask (N, T)."""
        enc = self.backbone.pad([self.tokens[r] for r in rows])
        hidden = self.backbone.trunk(enc).to(self.dtype).float()  # (N, T, H)
        mask = enc.attention_mask.to(hidden.device)  # (N, T)
        return hidden * mask[..., None].to(hidden.dtype), mask


# ---- choosing a policy ---------------------------------------------------------------------------------
@dataclass
class TrunkEstimate:
    """The cached size of a set of rows' trunk states."""

    rows: int
    """Distinct (context, response) rows."""
    mean_tokens: float
    """Mean tokens per row (over at most ``sample`` rows taken at an even stride)."""
    bytes: int
    """rows x mean tokens x hidden size x bytes per value."""


def estimate_trunk_bytes(backbone: Backbone, rows: Rows, dtype: torch.dtype, sample: int = 2048) -> TrunkEstimate:
    """Size of the trunk cache of ``rows`` (distinct ones) in ``dtype``, from the token counts of at most
    ``sample`` of them (every k-th: deterministic, cheap for any data size)."""
    distinct = list(_new_rows(rows, lambda _k: False).values())
    if not distinct:
        return TrunkEstimate(0, 0.0, 0)
    picked = distinct[:: max(1, len(distinct) // sample)][:sample]
    tokens = backbone.tokenize([c for c, _ in picked], [r for _, r in picked])
    mean = sum(len(t.ids) for t in tokens) / len(tokens)
    size = round(len(distinct) * mean * backbone.hidden_size * torch.empty(0, dtype=dtype).element_size())
    return TrunkEstimate(len(distinct), mean, size)


def choose_trunk_policy(mode: Literal["auto", "cached", "recompute"], estimate_bytes: int, budget_gb: float,
                        embeddings_only: bool) -> tuple[TrunkPolicy, str]:
    """(policy, why). ``auto``: recompute when the trunk is only the embeddings (a lookup is cheaper than
    reading its states back) or when the estimate exceeds the budget; cached otherwise."""
    if mode == "cached" or mode == "recompute":
        return mode, f"model.trunk_cache={mode}"
    if mode != "auto":
        raise ValueError(f"model.trunk_cache must be auto, cached or recompute, got {mode!r}")
    gb = estimate_bytes / 1e9
    if embeddings_only:
        return "recompute", "the trunk is the embeddings (top_layers = every block): recomputing is a lookup"
    if gb > budget_gb:
        return "recompute", f"estimate {gb:.3g} GB > model.trunk_cache_budget_gb {budget_gb:g}"
    return "cached", f"estimate {gb:.3g} GB <= model.trunk_cache_budget_gb {budget_gb:g}"
