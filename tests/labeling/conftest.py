"""Fixtures for the labeling tests: a running fake judge and samples with known answers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_judge import FakeJudge  # tests/ is on sys.path through tests/conftest.py

from dmoerm.data.records import Sample, Turn
from dmoerm.labeling import JudgeConfig


@pytest.fixture
def fake_judge() -> Iterator[FakeJudge]:
    """A started judge on 127.0.0.1 that prefers the longer response; tweak its attributes per test."""
    with FakeJudge() as server:
        yield server


@pytest.fixture
def judge_cfg(fake_judge: FakeJudge, tmp_path: Path) -> JudgeConfig:
    """A config pointing at the fake judge, with a fresh cache folder and fast backoff."""
    return JudgeConfig(base_url=fake_judge.url, model="fake-judge", concurrency=4, max_retries=3,
                       timeout_s=5.0, backoff_s=0.01, backoff_max_s=0.5,
                       cache_path=str(tmp_path / "judge-cache"))


def make_sample(sample_id: str, responses: list[str], ranks: list[int],
                category: str | None = "chat") -> Sample:
    return Sample(id=sample_id, context=[Turn("user", f"question {sample_id}")], responses=responses,
                  ranks=ranks, category=category)
