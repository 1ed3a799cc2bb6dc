"""cluster/image/Dockerfile (parsed: no docker on the test machines): a CUDA runtime base, the repo at /app
on PYTHONPATH, the project installed with its `gpu` extra under the repo's constraints.txt, whose CPU torch
pin the Dockerfile's own rewrite (run here) turns into the same CUDA release and nothing else. Every check
fails on a broken copy."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from cluster.checks import dockerfile_instructions, dockerfile_problems

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = (REPO / "cluster" / "image" / "Dockerfile").read_text()


def test_shipped_dockerfile_passes_every_check():
    assert dockerfile_problems(DOCKERFILE, "Dockerfile") == []
    steps = dockerfile_instructions(DOCKERFILE)
    assert ("COPY", "constraints.txt pyproject.toml README.md ./") in steps


def test_the_gpu_extra_holds_vllm():
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(dep.startswith("vllm") for dep in extras["gpu"])


def test_the_ignore_file_keeps_the_venv_out():
    ignored = (REPO / "cluster" / "image" / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", ".scratch", ".git"} <= set(ignored)


BROKEN = [
    ("a CPU base", "ARG CUDA_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu24.04", "ARG CUDA_IMAGE=python:3.12-slim",
     "FROM must be an nvidia/cuda *-runtime-* image"),
    ("no gpu extra", '-e ".[gpu]"', "-e .", "must install the project's gpu extra"),
    ("unconstrained install", 'pip install -c /tmp/constraints-gpu.txt -e ".[gpu]"', 'pip install -e ".[gpu]"',
     "must use the derived constraints"),
    ("constraints not derived", "constraints.txt > /tmp/constraints-gpu.txt", "constraints.txt | head",
     "no RUN derives the GPU constraints"),
    ("a pin dropped", "sed -E 's/^(torch==[^+ ]+)\\+cpu$/\\1/' constraints.txt", "grep -v '^ray==' constraints.txt",
     "must equal constraints.txt with only the +cpu local versions dropped"),
    ("torch left CPU-only", "sed -E 's/^(torch==[^+ ]+)\\+cpu$/\\1/' constraints.txt", "cat constraints.txt",
     "must equal constraints.txt with only the +cpu local versions dropped"),
    ("repo elsewhere", "WORKDIR /app", "WORKDIR /srv", "the repo must be at /app"),
    ("no PYTHONPATH", "ENV PYTHONPATH=/app", "ENV FOO=1", "ENV PYTHONPATH=/app is missing"),
]


@pytest.mark.parametrize("what,old,new,message", BROKEN, ids=[b[0] for b in BROKEN])
def test_each_check_fails_on_a_broken_copy(what, old, new, message):
    assert old in DOCKERFILE, f"the edit for {what!r} does not apply"
    problems = dockerfile_problems(DOCKERFILE.replace(old, new), "Dockerfile")
    assert any(message in p for p in problems), (what, problems)
