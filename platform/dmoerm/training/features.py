"""Frozen-trunk features, computed once and shared by every phase, expert and category.

``TrunkCache`` holds the trunk hidden states of each distinct (context, response) row, unpadded, so a
training batch is a padded stack of cached tensors and only the top blocks run per step. The router's
context features are ``dmoerm.modeling.router.context_features`` (the same function scoring uses).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence

import torch
from tqdm.auto import tqdm

from dmoerm.data.records import Sample, Turn
from dmoerm.modeling.backbone import Backbone, length_batches

logger = logging.getLogger(__name__)


def row_key(context: Sequence[Turn], response: str | None) -> str:
    blob = json.dumps([[[t.role, t.content] for t in context], response], ensure_ascii=False)
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()


class TrunkCache:
    """Trunk hidden states of (context, response) rows, each stored as a (T_i, H) tensor."""

    def __init__(self, backbone: Backbone, batch_size: int = 32, dtype: torch.dtype = torch.float32) -> None:
        self.backbone, self.batch_size, self.dtype = backbone, batch_size, dtype
        self.rows: list[torch.Tensor] = []
        self.index: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def add_samples(self, samples: Iterable[Sample], progress: bool = True) -> None:
        self.add_rows([(s.context, r) for s in samples for r in s.responses], progress=progress)

    def add_rows(self, rows: list[tuple[Sequence[Turn], str]], progress: bool = True) -> None:
        todo: dict[str, tuple[Sequence[Turn], str]] = {}
        for ctx, resp in rows:
            key = row_key(ctx, resp)
            if key not in self.index and key not in todo:
                todo[key] = (ctx, resp)
        if not todo:
            return
        keys = list(todo)
        tokens = self.backbone.tokenize([todo[k][0] for k in keys], [todo[k][1] for k in keys])
        start = len(self.rows)
        self.rows.extend([torch.empty(0)] * len(keys))
        for j, k in enumerate(keys):
            self.index[k] = start + j
        bar = tqdm(total=len(keys), desc="trunk features", unit="row", disable=not progress, leave=False)
        for batch in length_batches([len(t.ids) for t in tokens], self.batch_size):
            enc = self.backbone.pad([tokens[j] for j in batch])
            hidden = self.backbone.trunk(enc)  # (B, T, H)
            for i, j in enumerate(batch):
                n = len(tokens[j].ids)
                self.rows[start + j] = hidden[i, :n].to(self.dtype).clone()  # (T_i, H)
            bar.update(len(batch))
        bar.close()

    def row(self, context: Sequence[Turn], response: str) -> int:
        return self.index[row_key(context, response)]

    def lengths(self) -> list[int]:
        return [r.size(0) for r in self.rows]

    def collate(self, rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Row ids -> right-padded hidden (N, T, H) float32 and attention mask (N, T)."""
        width = max(self.rows[r].size(0) for r in rows)
        h = self.rows[rows[0]].size(1)
        hidden = torch.zeros(len(rows), width, h)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            t = self.rows[r]
            hidden[i, : t.size(0)] = t.float()
            mask[i, : t.size(0)] = 1
        return hidden, mask


def save_trunk_cache(cache: TrunkCache, path: str, dtype: torch.dtype = torch.float32) -> None:
    """One safetensors file, one tensor per row named by its row key."""
    from safetensors.torch import save_file

    save_file({k: cache.rows[i].to(dtype).contiguous() for k, i in cache.index.items()}, path)


def load_trunk_cache(backbone: Backbone, path: str, keys: Iterable[str] | None = None) -> TrunkCache:
    """Load all rows, or only ``keys`` (lazily, from the file's index), as float32."""
    from safetensors import safe_open

    cache = TrunkCache(backbone)
    with safe_open(path, framework="pt") as f:
        wanted = list(f.keys()) if keys is None else list(dict.fromkeys(keys))
        for k in wanted:
            cache.index[k] = len(cache.rows)
            cache.rows.append(f.get_tensor(k).float())
    return cache
