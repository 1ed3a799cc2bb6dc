"""Every test here runs tiny models: one torch thread (see ``torch_single_thread`` in tests/conftest.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _single_thread(torch_single_thread):
    yield
