"""Registry tests run against real local services (tests/services.py, tests/fixtures_s3.py)."""

from __future__ import annotations

from fixtures_s3 import s3_server  # noqa: F401  (tests/ is on sys.path: tests/conftest.py lives there)
from services import mlflow_server, mlflow_server_pg, postgres_server  # noqa: F401
