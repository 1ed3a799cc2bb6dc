"""Fixtures for the data and storage tests."""

from __future__ import annotations

from fixtures_s3 import s3_server  # noqa: F401  (tests/ is on sys.path: tests/conftest.py lives there)
