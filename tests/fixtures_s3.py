"""A real S3 endpoint for tests: moto's server over HTTP on 127.0.0.1 (no mocks of boto3).

Import the fixture into a ``conftest.py``: ``from fixtures_s3 import s3_server  # noqa: F401``.
For the whole session it points the environment at the server (``AWS_ENDPOINT_URL``, test credentials,
region), so code that reads its S3 configuration from the environment, as users' code does, just works.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

HOST = "127.0.0.1"


@dataclass
class S3Server:
    """moto's S3 server, in-process on a thread."""

    endpoint_url: str
    """``http://127.0.0.1:<port>``."""
    access_key: str = "testing"
    """Any key works against moto."""
    secret_key: str = "testing"
    """Matching secret (any value)."""
    region: str = "us-east-1"
    """Region for clients."""

    @property
    def env(self) -> dict[str, str]:
        """Environment for a process talking to this endpoint (also set in this process for the session)."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": self.region, "AWS_ENDPOINT_URL": self.endpoint_url}

    def client(self) -> Any:
        """A boto3 S3 client for this server."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name=self.region)

    def create_bucket(self, name: str) -> str:
        """Create bucket ``name`` (idempotent) and return it."""
        client = self.client()
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=name)
        return name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's ThreadedMotoServer for the session, with the environment pointed at it."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address=HOST, port=port, verbose=False)
    server.start()
    info = S3Server(f"http://{HOST}:{port}")
    with pytest.MonkeyPatch.context() as mp:
        for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(var, raising=False)
        for var, value in info.env.items():
            mp.setenv(var, value)
        try:
            yield info
        finally:
            server.stop()
