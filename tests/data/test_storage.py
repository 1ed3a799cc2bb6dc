"""dmoerm.storage on the local disk and on a real S3 endpoint (moto's server over HTTP)."""

from __future__ import annotations

import os

import pytest

from dmoerm import storage


def test_is_s3_and_join_uri(tmp_path):
    assert storage.is_s3("s3://b/k") and not storage.is_s3("/tmp/x") and not storage.is_s3(tmp_path)
    assert storage.join_uri("s3://b/data/", "/a/", "b.json") == "s3://b/data/a/b.json"
    assert storage.join_uri(tmp_path, "a", "b.json") == os.path.join(str(tmp_path), "a", "b.json")


def test_local_roundtrip_creates_parents(tmp_path):
    target = tmp_path / "deep" / "er" / "f.bin"
    storage.write_bytes(target, b"\x00abc")
    assert storage.read_bytes(target) == b"\x00abc"
    with storage.open_uri(f"file://{tmp_path}/t.txt", "w") as f:
        f.write("héllo\n")
    with storage.open_uri(tmp_path / "t.txt", "r") as f:
        assert f.read() == "héllo\n"
    assert storage.exists(target) and not storage.exists(tmp_path / "nope")


def test_local_write_is_atomic(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), storage.open_uri(target, "w") as f:
        f.write("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]  # no temp file left behind


def test_open_uri_rejects_unknown_mode(tmp_path):
    with pytest.raises(ValueError, match="mode"), storage.open_uri(tmp_path / "x", "a"):  # type: ignore[arg-type]
        pass


def test_local_list_and_dir_copies(tmp_path):
    src = tmp_path / "src"
    for rel in ("b.txt", "a/x.txt", "a/y/z.txt"):
        storage.write_bytes(src / rel, rel.encode())
    assert storage.list_uris(src) == sorted(str(src / r) for r in ("a/x.txt", "a/y/z.txt", "b.txt"))
    assert storage.list_uris(src / "b.txt") == [str(src / "b.txt")]
    assert storage.list_uris(tmp_path / "missing") == []
    storage.upload_dir(src, str(tmp_path / "copy"))
    assert (tmp_path / "copy" / "a" / "y" / "z.txt").read_bytes() == b"a/y/z.txt"
    storage.download_dir(str(tmp_path / "copy"), tmp_path / "back")
    assert (tmp_path / "back" / "b.txt").read_bytes() == b"b.txt"


def test_s3_roundtrip_through_environment(s3_server):
    bucket = s3_server.create_bucket("store-rt")
    uri = f"s3://{bucket}/x/data.bin"
    storage.write_bytes(uri, b"payload")  # no endpoint_url: AWS_ENDPOINT_URL set by the fixture
    assert storage.read_bytes(uri) == b"payload"
    assert s3_server.client().get_object(Bucket=bucket, Key="x/data.bin")["Body"].read() == b"payload"
    with storage.open_uri(f"s3://{bucket}/t.txt", "w") as f:
        f.write("日本語\n")
    with storage.open_uri(f"s3://{bucket}/t.txt", "r") as f:
        assert f.read() == "日本語\n"


def test_s3_missing_object_and_failed_write(s3_server):
    bucket = s3_server.create_bucket("store-missing")
    with pytest.raises(FileNotFoundError, match="nope"):
        storage.read_bytes(f"s3://{bucket}/nope")
    with pytest.raises(RuntimeError), storage.open_uri(f"s3://{bucket}/partial", "wb") as f:
        f.write(b"half")
        raise RuntimeError("killed")
    assert not storage.exists(f"s3://{bucket}/partial")


def test_s3_exists_and_list_uris_treat_key_as_folder(s3_server):
    bucket = s3_server.create_bucket("store-list")
    for key in ("data/b.json", "data/a/c.json", "data2/d.json"):
        storage.write_bytes(f"s3://{bucket}/{key}", b"{}")
    assert storage.list_uris(f"s3://{bucket}/data") == [f"s3://{bucket}/data/a/c.json",
                                                         f"s3://{bucket}/data/b.json"]
    assert storage.list_uris(f"s3://{bucket}/data/b.json") == [f"s3://{bucket}/data/b.json"]
    assert storage.exists(f"s3://{bucket}/data") and storage.exists(f"s3://{bucket}/data/b.json")
    assert not storage.exists(f"s3://{bucket}/dat") and not storage.exists(f"s3://{bucket}/data/zz")


def test_s3_upload_and_download_dir(s3_server, tmp_path):
    bucket = s3_server.create_bucket("store-dirs")
    src = tmp_path / "ckpt"
    storage.write_bytes(src / "model.safetensors", b"w" * 1000)
    storage.write_bytes(src / "sub" / "config.json", b'{"a": 1}')
    written = storage.upload_dir(src, f"s3://{bucket}/runs/1/")
    assert written == [f"s3://{bucket}/runs/1/model.safetensors", f"s3://{bucket}/runs/1/sub/config.json"]
    storage.download_dir(f"s3://{bucket}/runs/1", tmp_path / "back")
    assert (tmp_path / "back" / "sub" / "config.json").read_bytes() == b'{"a": 1}'
    assert (tmp_path / "back" / "model.safetensors").read_bytes() == b"w" * 1000


def test_explicit_endpoint_wins_and_s3_specific_env_is_read(s3_server, monkeypatch):
    bucket = s3_server.create_bucket("store-endpoint")
    storage.write_bytes(f"s3://{bucket}/k", b"v")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    assert storage.read_bytes(f"s3://{bucket}/k", endpoint_url=s3_server.endpoint_url) == b"v"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint_url)  # the service-specific variable wins
    assert storage.read_bytes(f"s3://{bucket}/k") == b"v"


def test_importing_the_library_loads_no_heavy_dependency():
    import subprocess
    import sys

    code = ("import sys, dmoerm.storage, dmoerm.data; "
            "print(sorted(m for m in ('boto3', 'botocore', 'pyarrow', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
