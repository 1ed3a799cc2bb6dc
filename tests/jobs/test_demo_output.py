"""What a person sees when the Ray job runs (``make demo``'s first half) on the job tests' tiny task with
the aggregator search on: a line per stage as it starts and ends, the table and the registration, and
nothing of Ray's (no worker lines, no warnings, no traceback); all of that is in the run's log file, whose
path is the first line printed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pipeline_fixtures import REPO, write_config, write_task

pytestmark = [pytest.mark.ray, pytest.mark.integration, pytest.mark.slow]
RAY_NOISE = re.compile(r"Traceback|WARNING|Warning:|\(raylet\)|pid=\d+|ray\.|RAY_|\x1b\[")


def test_the_terminal_shows_stages_and_results_and_the_log_file_holds_the_rest(tmp_path, tiny_bert_dir):
    data = write_task(tmp_path, n=60)
    config = write_config(tmp_path, tiny_bert_dir, data, str(tmp_path / "store"), None, name="quiet")
    out = subprocess.run([sys.executable, "-m", "jobs.run_pipeline", "--config", config, "--num-cpus", "2"], cwd=REPO,
                         capture_output=True, text=True, timeout=900,
                         env={k: v for k, v in os.environ.items() if k != "DMOERM_LOG_LEVEL"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.splitlines()

    first = re.fullmatch(r"log \(this job's, Ray's and its workers'\): (.+)", lines[0])
    assert first, lines[0]
    log = Path(first[1])
    assert log.parent == tmp_path / "store" / "logs" and log.name.startswith("quiet-") and log.suffix == ".log"

    result = next(x for x in lines if x.startswith("RESULT "))
    stages = list(json.loads(result[len("RESULT "):])["ran"])
    assert {"data", "trunk", "phase1/alpha", "baseline", "experts/beta/beta_taste", "search/alpha",
            "aggregator/beta", "evaluate", "register"} <= set(stages), stages
    for stage in stages:  # "[   12.3 s] phase1/alpha    started", then "[...] phase1/alpha    done    4.1 s"
        events = [x.split("] ", 1)[1] for x in lines if re.match(rf"\[[^]]*\] {re.escape(stage)} ", x)]
        assert len(events) == 2 and events[0].split()[1:] == ["started"], (stage, events)
        assert re.fullmatch(rf"{re.escape(stage)} +done +(\d+\.\d s|\d+:\d\d)", events[1]), events[1]
    assert any(x.startswith("registered quiet version 1: ") for x in lines), lines
    assert any("DMoERM" in x and "single RM" in x for x in lines)  # the table's header

    noise = [x for x in lines + out.stderr.splitlines() if RAY_NOISE.search(x)]
    assert not noise, noise[:20]
    assert out.stderr == "", out.stderr[-3000:]

    text = log.read_text()
    assert re.search(r"INFO dmoerm\.pipeline: phase1/alpha +done", text)  # the library's log lines
    assert "(_run_step pid=" in text and "stage trunk/" in text  # the workers' lines, forwarded by Ray
    # (the experts: small ones train in plain-task worker groups, platform.expert_resources.group auto, so this
    # tiny job starts no Ray Train worker; their stage lines are the driver's, above)
    assert re.search(r"INFO dmoerm\.pipeline: experts/alpha/alpha_taste +done", text)
    assert "Configuration for experiment" in text  # Ray Tune's own report
