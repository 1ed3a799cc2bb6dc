"""Idempotent stage outputs.

A stage's identity is a hash of its config slice and its inputs' identities (upstream stage keys, data
file fingerprints). Its outputs live under ``<storage>/stages/<stage>/<key>/`` and ``DONE.json`` is
written last, so a re-run skips a finished stage and a killed one starts over cleanly. With ``s3://``
storage, files are written to a local mirror and uploaded; readers download what they miss.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from dmoerm import storage
from dmoerm.configtools import to_dict
from dmoerm.data.records import Sample

logger = logging.getLogger(__name__)
DONE = "DONE.json"


def stable_hash(obj: Any) -> str:
    blob = json.dumps(to_dict(obj), sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def fingerprint_uri(uri: str) -> str:
    """sha256 of a file's bytes (a folder: of its files' names and bytes)."""
    h = hashlib.sha256()
    uris = [uri] if storage.exists(uri) and not Path(uri).is_dir() else storage.list_uris(uri)
    for u in sorted(uris):
        h.update(u.rsplit("/", 1)[-1].encode())
        h.update(storage.read_bytes(u))
    return h.hexdigest()[:16]


class StageStore:
    """Stage outputs under ``<root>/stages/<stage>/<key>/``; picklable, so the store itself is what travels
    to Ray tasks and workers."""

    def __init__(self, root: str, local_cache: str | None = None, run_id: str = "") -> None:
        # Absolute: Ray Train and Tune workers run in their own working directories.
        self.root = root.rstrip("/") if storage.is_s3(root) else os.path.abspath(root)
        self.run_id = run_id  # recorded in DONE.json: a stage done by another run was skipped by this one
        self.remote = storage.is_s3(root)
        if self.remote:
            self.local_root = Path(local_cache or os.environ.get("DMOERM_LOCAL_CACHE")
                                   or Path(tempfile.gettempdir()) / "dmoerm-stage-cache")
        else:
            self.local_root = Path(root)
        self.local_root.mkdir(parents=True, exist_ok=True)

    # ---- identity ----------------------------------------------------------------------------
    @staticmethod
    def key(**parts: Any) -> str:
        return stable_hash(parts)

    def uri(self, stage: str, key: str, name: str = "") -> str:
        return storage.join_uri(self.root, "stages", stage, key, *([name] if name else []))

    def local(self, stage: str, key: str) -> Path:
        d = self.local_root / "stages" / stage / key
        d.mkdir(parents=True, exist_ok=True)
        return d

    # ---- status ------------------------------------------------------------------------------
    def done(self, stage: str, key: str) -> dict | None:
        uri = self.uri(stage, key, DONE)
        if not storage.exists(uri):
            return None
        return json.loads(storage.read_bytes(uri))

    def mark_done(self, stage: str, key: str, info: dict | None = None) -> None:
        """Upload the stage's local files (remote storage), then write DONE.json last."""
        if self.remote:
            storage.upload_dir(str(self.local(stage, key)), self.uri(stage, key))
        info = {**(info or {}), "run": self.run_id}
        storage.write_bytes(self.uri(stage, key, DONE), json.dumps(info, default=str).encode())
        logger.info("stage %s/%s done", stage, key)

    # ---- files -------------------------------------------------------------------------------
    def path(self, stage: str, key: str, name: str) -> Path:
        """A local path to a stage file, downloaded from remote storage when missing here."""
        p = self.local(stage, key) / name
        if not p.exists() and self.remote:
            uri = self.uri(stage, key, name)
            p.parent.mkdir(parents=True, exist_ok=True)
            try:
                p.write_bytes(storage.read_bytes(uri))
            except FileNotFoundError:
                with contextlib.suppress(FileNotFoundError):  # absent: the caller sees a missing path
                    storage.download_dir(uri, str(p))  # a folder, e.g. a bundle
        return p

    def put_json(self, stage: str, key: str, name: str, obj: Any) -> None:
        p = self.local(stage, key) / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(obj, indent=1, default=str, ensure_ascii=False))
        if self.remote and self.done(stage, key) is not None:
            storage.write_bytes(self.uri(stage, key, name), p.read_bytes())

    def get_json(self, stage: str, key: str, name: str) -> Any:
        return json.loads(self.path(stage, key, name).read_text())

    def put_samples(self, stage: str, key: str, name: str, samples: list[Sample]) -> None:
        from dmoerm.data.loaders import write_samples

        write_samples(str(self.local(stage, key) / name), samples)

    def get_samples(self, stage: str, key: str, name: str) -> list[Sample]:
        from dmoerm.data.loaders import SourceConfig, load_source

        return load_source(SourceConfig(path=str(self.path(stage, key, name)), format="dmoerm")).samples

