"""The cluster definitions' tests: the repo root on sys.path (``cluster.*``, ``serve.*``, ``jobs.*``), the
real MLflow server fixture for the cost tool."""

from __future__ import annotations

import sys
from pathlib import Path

from services import mlflow_server  # noqa: F401  (tests/ is on sys.path; tests/conftest.py has s3_server)

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
