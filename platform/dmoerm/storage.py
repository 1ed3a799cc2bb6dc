"""One way to read and write files whether they live on the local disk or in S3.

A *URI* is either a local path (``data/train.jsonl``, ``/abs/path``, ``file:///abs/path``) or an S3 URI
(``s3://bucket/key``). S3 goes through boto3 with its ordinary configuration: credentials, region and the
``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` endpoint variables come from the environment (boto3 reads
them itself; nothing here logs them), and every function also takes an explicit ``endpoint_url`` (e.g. a
MinIO or moto server) that wins over the environment.

Writes are atomic: a local file is written to a temporary file beside it and moved into place with
``os.replace``; an S3 object is uploaded only once the ``with`` block has finished without an exception.
So a killed job never leaves a half-written file behind.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Literal

logger = logging.getLogger(__name__)

Mode = Literal["rb", "wb", "r", "w"]
_MODES = ("rb", "wb", "r", "w")


def is_s3(uri: str | os.PathLike[str]) -> bool:
    """Whether ``uri`` names an S3 object (``s3://bucket/key``)."""
    return isinstance(uri, str) and uri.startswith("s3://")


def _local(uri: str | os.PathLike[str]) -> str:
    path = os.fspath(uri)
    return path[len("file://"):] if path.startswith("file://") else path


def _split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"S3 URI {uri!r} has no bucket; expected s3://bucket/key")
    return bucket, key


def _client(endpoint_url: str | None) -> Any:
    import boto3  # heavy: only when S3 is used

    # endpoint_url=None lets boto3 apply AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL itself.
    return boto3.client("s3", endpoint_url=endpoint_url)


def _is_missing(err: Exception) -> bool:
    code = str(getattr(err, "response", {}).get("Error", {}).get("Code", ""))
    return code in ("404", "NoSuchKey", "NotFound")


def join_uri(base: str | os.PathLike[str], *parts: str) -> str:
    """Join path parts onto a local path or an S3 URI (always ``/`` for S3)."""
    if is_s3(base):
        out = str(base).rstrip("/")
        for part in parts:
            part = part.strip("/")
            if part:
                out = f"{out}/{part}"
        return out
    return os.path.join(_local(base), *parts)


@contextmanager
def open_uri(uri: str | os.PathLike[str], mode: Mode = "rb", *,
             endpoint_url: str | None = None) -> Iterator[IO[Any]]:
    """Open a local file or an S3 object; text modes (``"r"``, ``"w"``) use UTF-8.

    Reading S3 stages the object in a seekable temporary file (so parquet and gzip readers work). Writing
    is atomic: nothing appears at ``uri`` unless the block exits without an exception. Missing local parent
    folders are created.

    Raises:
        FileNotFoundError: reading a local path or S3 object that does not exist.
        ValueError: an unknown mode or a malformed S3 URI.
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if is_s3(uri):
        with _open_s3(str(uri), mode, endpoint_url) as f:
            yield f
    elif mode in ("rb", "r"):
        with open(_local(uri), mode, **({"encoding": "utf-8"} if mode == "r" else {})) as f:
            yield f
    else:
        with _open_local_atomic(_local(uri), mode) as f:
            yield f


@contextmanager
def _open_local_atomic(path: str, mode: str) -> Iterator[IO[Any]]:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextmanager
def _open_s3(uri: str, mode: str, endpoint_url: str | None) -> Iterator[IO[Any]]:
    bucket, key = _split_s3(uri)
    if not key:
        raise ValueError(f"S3 URI {uri!r} names a bucket, not an object")
    client = _client(endpoint_url)
    with tempfile.TemporaryFile() as buf:  # a real file: seekable, and TextIOWrapper-able
        if mode in ("rb", "r"):
            try:
                client.download_fileobj(bucket, key, buf)
            except Exception as err:
                if _is_missing(err):
                    raise FileNotFoundError(f"no such S3 object: {uri}") from err
                raise
            buf.seek(0)
            yield io.TextIOWrapper(buf, encoding="utf-8") if mode == "r" else buf
            return
        if mode == "w":
            text = io.TextIOWrapper(buf, encoding="utf-8")
            yield text
            text.flush()
            text.detach()
        else:
            yield buf
        buf.seek(0)
        client.upload_fileobj(buf, bucket, key)
        logger.debug("uploaded %s", uri)


def read_bytes(uri: str | os.PathLike[str], *, endpoint_url: str | None = None) -> bytes:
    """The whole content of a local file or S3 object."""
    with open_uri(uri, "rb", endpoint_url=endpoint_url) as f:
        return f.read()


def write_bytes(uri: str | os.PathLike[str], data: bytes, *, endpoint_url: str | None = None) -> None:
    """Write ``data`` to a local file or S3 object atomically, replacing what was there."""
    with open_uri(uri, "wb", endpoint_url=endpoint_url) as f:
        f.write(data)


def exists(uri: str | os.PathLike[str], *, endpoint_url: str | None = None) -> bool:
    """Whether a file or folder exists; for S3, an object at the key or any object under ``key/``."""
    if not is_s3(uri):
        return os.path.exists(_local(uri))
    bucket, key = _split_s3(str(uri))
    client = _client(endpoint_url)
    if key:
        try:
            client.head_object(Bucket=bucket, Key=key)
            return True
        except Exception as err:
            if not _is_missing(err):
                raise
    prefix = key.rstrip("/") + "/" if key else ""
    return bool(client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1).get("KeyCount", 0))


def list_uris(prefix: str | os.PathLike[str], *, endpoint_url: str | None = None) -> list[str]:
    """Every file under a folder (recursively), sorted; ``[prefix]`` if it is a file; ``[]`` if absent.

    For S3 the key is treated as a folder (``s3://b/data`` lists ``data/...``, never ``data2/...``),
    unless an object exists at exactly that key.
    """
    if not is_s3(prefix):
        path = _local(prefix)
        if os.path.isfile(path):
            return [path]
        found = [str(p) for p in Path(path).rglob("*") if p.is_file()] if os.path.isdir(path) else []
        return sorted(found)
    bucket, key = _split_s3(str(prefix))
    client = _client(endpoint_url)
    folder = key.rstrip("/") + "/" if key else ""
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key.rstrip("/")):
        for obj in page.get("Contents", []):
            if obj["Key"] == key or obj["Key"].startswith(folder):
                keys.append(obj["Key"])
    if key in keys:
        return [f"s3://{bucket}/{key}"]
    return sorted(f"s3://{bucket}/{k}" for k in keys if not k.endswith("/"))


def _relative(uri: str, base: str) -> str:
    if is_s3(uri):
        return uri[len(base.rstrip("/")) + 1:]
    return os.path.relpath(uri, _local(base))


def upload_dir(local_dir: str | os.PathLike[str], uri: str, *, endpoint_url: str | None = None) -> list[str]:
    """Copy every file under ``local_dir`` to the folder ``uri`` (S3 or local); returns the written URIs."""
    src = _local(local_dir)
    if not os.path.isdir(src):
        raise FileNotFoundError(f"upload_dir: {src!r} is not a folder")
    written = []
    for path in list_uris(src):
        target = join_uri(uri, *Path(os.path.relpath(path, src)).parts)
        if is_s3(target):
            bucket, key = _split_s3(target)
            _client(endpoint_url).upload_file(path, bucket, key)
        else:
            with open_uri(target, "wb") as out, open(path, "rb") as f:
                shutil.copyfileobj(f, out)
        written.append(target)
    logger.info("uploaded %d files from %s to %s", len(written), src, uri)
    return written


def download_dir(uri: str | os.PathLike[str], local_dir: str | os.PathLike[str], *,
                 endpoint_url: str | None = None) -> list[str]:
    """Copy every file under the folder ``uri`` into ``local_dir``; returns the local paths written."""
    files = list_uris(uri, endpoint_url=endpoint_url)
    if not files:
        raise FileNotFoundError(f"download_dir: nothing found under {os.fspath(uri)!r}")
    dest = _local(local_dir)
    written = []
    for src in files:
        rel = _relative(src, os.fspath(uri)) if src != os.fspath(uri) else os.path.basename(src)
        target = os.path.join(dest, *rel.split("/"))
        with open_uri(src, "rb", endpoint_url=endpoint_url) as f, open_uri(target, "wb") as out:
            shutil.copyfileobj(f, out)
        written.append(target)
    logger.info("downloaded %d files from %s to %s", len(written), os.fspath(uri), dest)
    return written
