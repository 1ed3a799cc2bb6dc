"""Real local services for tests, as session-scoped pytest fixtures (no mocks of the services themselves).

- ``mlflow_server``: ``mlflow server`` on a SQLite file with proxied artifacts in a temp folder.
- ``postgres_server``: a private PostgreSQL 15 on 127.0.0.1; yields its SQLAlchemy URL.
- ``mlflow_server_pg``: ``mlflow server`` on that PostgreSQL with artifacts in a bucket of moto's S3 server
  (the ``s3_server`` fixture of ``fixtures_s3``, which the conftest must import too),
  i.e. the scaled deployment's shape (an MLflow server on PostgreSQL with S3 artifacts) on one machine.

Everything binds to 127.0.0.1 on a free port and is removed at the end of the session. Import the fixtures
into a ``conftest.py`` (``from services import mlflow_server  # noqa: F401``); the helpers
``start_mlflow_server`` and ``start_postgres`` can also be used on their own.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fixtures_s3 import S3Server

PG_BIN = Path("/usr/lib/postgresql/15/bin")
HOST = "127.0.0.1"


def free_port() -> int:
    """A port free on 127.0.0.1 right now (small race with other processes; fine for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _log_tail(path: Path, num_chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-num_chars:]
    except OSError:
        return "<no log>"


# ----------------------------------------------------------------------------------------------- MLflow


@dataclass
class MlflowServer:
    """A running ``mlflow server`` subprocess."""

    tracking_uri: str
    """``http://127.0.0.1:<port>``: pass to ``MlflowClient(tracking_uri=...)`` or ``MLFLOW_TRACKING_URI``."""
    backend_store_uri: str
    """Where runs and the registry are stored (``sqlite:///...`` or ``postgresql://...``)."""
    artifacts_destination: str
    """Where the server writes the artifacts it proxies (a folder or ``s3://bucket/prefix``)."""
    log_path: Path
    """The server's stdout and stderr."""
    startup_s: float
    """Seconds from launch until ``GET /health`` answered."""


@contextlib.contextmanager
def start_mlflow_server(
    backend_store_uri: str,
    artifacts_destination: str,
    workdir: Path,
    extra_env: dict[str, str] | None = None,
    timeout_s: float = 90.0,
) -> Iterator[MlflowServer]:
    """Run ``mlflow server`` (1 worker, job execution off) until the context exits."""
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"mlflow-server-{port}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")}
    env.update(
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",  # 2 processes / 0.5 GB instead of 10 / 2.4 GB
        MLFLOW_DISABLE_TELEMETRY="true",
        **(extra_env or {}),
    )
    cmd = [
        str(Path(sys.executable).with_name("mlflow")),
        "server",
        "--host", HOST,
        "--port", str(port),
        "--workers", "1",
        "--backend-store-uri", backend_store_uri,
        "--artifacts-destination", artifacts_destination,
    ]
    if not Path(cmd[0]).exists():  # e.g. an interpreter outside a virtual environment
        cmd[0:1] = [sys.executable, "-m", "mlflow"]
    started = time.monotonic()
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)  # own process group: the workers stop with it
    url = f"http://{HOST}:{port}"
    try:
        _wait_for_health(url, proc, log_path, timeout_s)
        yield MlflowServer(url, backend_store_uri, artifacts_destination, log_path,
                           time.monotonic() - started)
    finally:
        _stop_group(proc)


def _wait_for_health(url: str, proc: subprocess.Popen, log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}:\n{_log_tail(log_path)}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"mlflow server at {url} not healthy after {timeout_s:.0f}s:\n{_log_tail(log_path)}")


def _stop_group(proc: subprocess.Popen, timeout_s: float = 15.0) -> None:
    """SIGTERM the process group this module started (by its id), SIGKILL it if it lingers."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """``mlflow server`` on SQLite with proxied artifacts in a temp folder, for the whole session."""
    root = tmp_path_factory.mktemp("mlflow-sqlite")
    with start_mlflow_server(f"sqlite:///{root / 'mlflow.db'}", str(root / "artifacts"), root) as server:
        yield server


# ------------------------------------------------------------------------------------------- PostgreSQL


@contextlib.contextmanager
def start_postgres(database: str = "mlflow", timeout_s: float = 60.0) -> Iterator[str]:
    """A throw-away PostgreSQL 15 cluster on 127.0.0.1; yields ``postgresql://postgres@127.0.0.1:PORT/db``.

    ``initdb``/``pg_ctl`` refuse to run as root, so as root they run as user ``postgres`` (``runuser``) in
    a temp folder owned by it; as any other user they run as that user. Trust authentication, local only.
    """
    as_root = os.geteuid() == 0
    prefix = ["runuser", "-u", "postgres", "--"] if as_root else []
    superuser = "postgres" if as_root else os.environ.get("USER", "postgres")
    root = Path(tempfile.mkdtemp(prefix="dmoerm-pg-"))  # not under pytest's 0700 tmp: postgres must enter
    if as_root:
        shutil.chown(root, user="postgres", group="postgres")
    data, log_path, port = root / "data", root / "postgres.log", free_port()

    def run(*args: str) -> None:
        out = subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=timeout_s)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}\n"
                               f"{_log_tail(log_path)}")

    started = False
    try:
        run(str(PG_BIN / "initdb"), "-D", str(data), "-U", superuser, "-A", "trust", "-E", "UTF8",
            "--no-sync", "--no-instructions")
        # fsync off (-F): a test database need not survive a power cut.
        run(str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(log_path), "-w", "-t", str(int(timeout_s)),
            "-o", f"-h {HOST} -p {port} -k {root} -F", "start")
        started = True
        run(str(PG_BIN / "createdb"), "-h", HOST, "-p", str(port), "-U", superuser, database)
        yield f"postgresql://{superuser}@{HOST}:{port}/{database}"
    finally:
        if started:
            with contextlib.suppress(Exception):
                run(str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


def postgres_skip_reason() -> str | None:
    """Why a private PostgreSQL cannot run here, or None when it can."""
    if not (PG_BIN / "initdb").exists():
        return f"PostgreSQL 15 binaries not found under {PG_BIN} (Debian package postgresql-15)"
    if os.geteuid() == 0 and (shutil.which("runuser") is None or _no_user("postgres")):
        return "running as root needs `runuser` and a `postgres` user to run initdb/pg_ctl"
    try:
        import psycopg  # noqa: F401  (SQLAlchemy 2.x's driver for postgresql://)
    except ImportError:
        return "psycopg (v3) is not installed: pip install -c constraints.txt 'psycopg[binary]'"
    return None


def _no_user(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return True
    return False


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """SQLAlchemy URL of a private PostgreSQL 15 database ``mlflow`` for the whole session."""
    reason = postgres_skip_reason()
    if reason:
        pytest.skip(reason)
    with start_postgres() as url:
        yield url


@pytest.fixture(scope="session")
def mlflow_server_pg(
    postgres_server: str, s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MlflowServer]:
    """``mlflow server`` on the private PostgreSQL with artifacts in ``s3://mlflow-artifacts/`` on moto."""
    bucket = s3_server.create_bucket("mlflow-artifacts")
    root = tmp_path_factory.mktemp("mlflow-pg")
    env = {**s3_server.env, "MLFLOW_S3_ENDPOINT_URL": s3_server.endpoint_url}
    with start_mlflow_server(postgres_server, f"s3://{bucket}/mlflow", root, extra_env=env) as server:
        yield server
