"""Tests marked ``gpu`` here need a CUDA device: they are skipped, with the reason, where torch sees none."""

from __future__ import annotations

import pytest


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("gpu") is None:
        return
    import torch

    if not torch.cuda.is_available():
        pytest.skip(f"needs a CUDA device (torch {torch.__version__} sees none)")
