"""jobs/generate_candidates.py on a local Ray instance: prompts sharded over two generator actors give the
same candidates as an in-process ``generate_candidates`` run, through the library call and the command."""

from __future__ import annotations

import json
import sys

import pytest
from pipeline_fixtures import REPO
from tiny_causal import save_tiny_causal

from dmoerm.data.records import Turn
from dmoerm.generation import GenerationConfig, generate_candidates

PROMPTS = [f"question {i}: " + "tell me more " * (i % 4) for i in range(6)] + [
    [Turn("user", "how do I fix my bike?")], [Turn("system", "be brief"), Turn("user", "a cake recipe please")]]


@pytest.mark.ray
@pytest.mark.slow
def test_ray_job_gives_the_in_process_candidates(local_ray, tmp_path, torch_single_thread):
    if str(REPO) not in sys.path:  # jobs/ is the checkout's Ray layer, not an installed package
        sys.path.insert(0, str(REPO))
    from jobs.generate_candidates import generate_candidates_ray, main

    policy = save_tiny_causal(tmp_path / "policy")
    cfg = GenerationConfig(model=policy, num_candidates=4, max_new_tokens=6, batch_size=3, seed=3,
                           backend="transformers")
    expected = generate_candidates(PROMPTS, cfg, progress=False)
    assert all(len(set(c)) == 4 for c in expected)

    assert generate_candidates_ray(PROMPTS, cfg, num_workers=2, progress=False) == expected

    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p} if isinstance(p, str) else
                                      {"id": f"p{i}", "context": [{"role": t.role, "content": t.content} for t in p]})
                           + "\n" for i, p in enumerate(PROMPTS)))
    out = tmp_path / "candidates.jsonl"
    rc = main(["--prompts", str(src), "--out", str(out), "--num-workers", "2", f"model={policy}",
               "num_candidates=4", "max_new_tokens=6", "batch_size=2", "seed=3", "backend=transformers"])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"p{i}" for i in range(len(PROMPTS))]
    assert [r["candidates"] for r in rows] == expected, "batch size 2 on Ray = batch size 3 in process"
    assert rows[6]["context"] == [{"role": "user", "content": "how do I fix my bike?"}]
    assert rows[0]["generation"]["seed"] == 3


def test_bad_overrides_fail_before_ray_starts(tmp_path, capsys):
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from jobs.generate_candidates import main

    src = tmp_path / "prompts.jsonl"
    src.write_text(json.dumps({"prompt": "hi"}) + "\n")
    assert main(["--prompts", str(src), "--out", str(tmp_path / "o.jsonl"), "model=m", "num_candidate=4"]) == 2
    assert "generation.num_candidate" in capsys.readouterr().err
