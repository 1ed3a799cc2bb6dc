"""The stage progress view: one plain line per event off a terminal, a live block redrawn in place on one,
concurrent stages under one group bar; and the run log's redirect of this process's output."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dmoerm.pipeline import LocalExecutor
from dmoerm.progress import StageProgress, format_seconds
from dmoerm.runlog import log_dir, log_level, log_to_file
from dmoerm.stages.store import StageStore


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _screen(text: str) -> list[str]:
    """The lines a terminal shows after ``text``: what the live view's ``ESC[nF`` (n lines up),
    ``ESC[J`` (clear below) and carriage returns leave on screen."""
    lines, row = [""], 0
    for token in re.split(r"(\x1b\[\d*F|\x1b\[J|\r|\n)", text):
        if token.startswith("\x1b[") and token.endswith("F"):
            row = max(0, row - int(token[2:-1] or 1))
        elif token == "\x1b[J":
            del lines[row + 1:]
            lines[row] = ""
        elif token == "\r":
            lines[row] = ""
        elif token == "\n":
            row += 1
            if row == len(lines):
                lines.append("")
        elif token:
            lines[row] += token
    return [x for x in lines if x]


def test_plain_output_is_one_line_per_event():
    out = io.StringIO()
    with StageProgress(out) as p:
        p.start("data")
        p.finish("data", "done", 1.25)
        p.start("phase1/alpha", group="phase1 + baseline")
        p.start("baseline", group="phase1 + baseline")
        p.finish("baseline", "skipped", 0.5)
        p.finish("phase1/alpha", "failed", 65)
    lines = out.getvalue().splitlines()
    assert "\x1b" not in out.getvalue()  # a CI log gets no cursor movement
    assert len(lines) == 7, lines
    assert lines[0].endswith("started") and "data" in lines[0]
    assert "data" in lines[1] and "done" in lines[1] and lines[1].endswith("1.2 s")
    assert "baseline" in lines[4] and "skipped (finished earlier)" in lines[4]
    assert "phase1/alpha" in lines[5] and "FAILED" in lines[5] and lines[5].endswith("1:05")
    assert lines[6].startswith("3 stages in ")


def test_live_view_redraws_running_stages_under_a_group_bar():
    out = _Tty()
    p = StageProgress(out, refresh_s=0.05)
    assert p.live
    for name in ("experts/a/x", "experts/a/y", "experts/b/x"):
        p.start(name, group="experts")
    p.finish("experts/a/y", "done", 3.0)
    time.sleep(0.3)  # the ticker redraws the elapsed times meanwhile
    screen = _screen(out.getvalue())
    assert screen[0].split()[:2] == ["experts/a/y", "done"] and screen[0].endswith("3.0 s")
    assert screen[1].startswith("experts ") and "1/3" in screen[1]  # the group's bar counts the finished ones
    assert [x.split()[:2] for x in screen[2:4]] == [["experts/a/x", "running"], ["experts/b/x", "running"]]
    assert screen[4].startswith("elapsed ") and len(screen) == 5
    p.close()
    screen = _screen(out.getvalue())
    assert len(screen) == 2 and screen[1].startswith("1 stages in ")  # the live block is cleared


def test_bad_status_is_named():
    with pytest.raises(ValueError, match="'ok' is not one of"):
        StageProgress(io.StringIO()).finish("data", "ok")


def test_local_executor_reports_every_stage(tmp_path):
    store = StageStore(str(tmp_path), run_id="this-run")
    StageStore(str(tmp_path), run_id="an-earlier-run").mark_done("baseline", "old")
    out = io.StringIO()
    ex = LocalExecutor(cfg=None, store=store, progress=StageProgress(out))  # type: ignore[arg-type]

    def step(cfg, store: StageStore, stage: str, key: str) -> str:
        if key == "boom":
            raise RuntimeError("boom")
        if store.done(stage, key) is None:
            store.mark_done(stage, key)
        return key

    assert ex.run_many(step, [("phase1", "new"), ("baseline", "old")], ["phase1/a", "baseline"]) == ["new", "old"]
    with pytest.raises(RuntimeError):
        ex.run(step, "trunk", "boom", name="trunk")
    lines = out.getvalue().splitlines()
    assert [x.split("]", 1)[1].split()[:2] for x in lines] == [
        ["phase1/a", "started"], ["phase1/a", "done"], ["baseline", "started"], ["baseline", "skipped"],
        ["trunk", "started"], ["trunk", "FAILED"]]
    assert ex.ran == {"phase1/a": True, "baseline": False}


def test_format_seconds():
    assert [format_seconds(s) for s in (4.24, 59.9, 187, 3729)] == ["4.2 s", "59.9 s", "3:07", "1:02:09"]


# ---- the run log -------------------------------------------------------------------------------
def test_log_dir_is_beside_the_stages_where_they_are_local(tmp_path):
    assert log_dir(str(tmp_path / "st"), str(tmp_path / "out")) == tmp_path / "st" / "logs"
    assert log_dir("s3://b/st", str(tmp_path / "out")) == tmp_path / "out" / "logs"
    assert log_dir("s3://b/st", "s3://b/out") == Path(".scratch/logs")


def test_log_level_from_the_environment(monkeypatch):
    monkeypatch.delenv("DMOERM_LOG_LEVEL", raising=False)
    assert log_level() == (logging.INFO, False)
    assert log_level(verbose=True) == (logging.INFO, True)
    monkeypatch.setenv("DMOERM_LOG_LEVEL", "debug")
    assert log_level() == (logging.DEBUG, True)
    monkeypatch.setenv("DMOERM_LOG_LEVEL", "chatty")
    with pytest.raises(ValueError, match="DMOERM_LOG_LEVEL='CHATTY' is not a logging level"):
        log_level()


_CHILD = """
import logging, os, subprocess, sys, threading, warnings
from dmoerm.runlog import log_to_file
with log_to_file(sys.argv[1]) as terminal:
    print("for the person", file=terminal)
    print("a print")
    logging.getLogger("dmoerm.x").info("a library line")
    warnings.warn("a warning")
    os.write(2, b"a C-level write\\n")
    subprocess.run([sys.executable, "-c", "import sys; sys.stderr.write('a child process\\\\n')"])
    t = threading.Thread(target=lambda: 1 / 0)
    t.start()
    t.join()
print("after")
"""


def test_log_to_file_sends_everything_but_the_terminal_stream_to_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv("DMOERM_LOG_LEVEL", raising=False)
    log = tmp_path / "logs" / "run.log"
    out = subprocess.run([sys.executable, "-c", _CHILD, str(log)], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["for the person", "after"]
    assert out.stderr == ""
    text = log.read_text()
    for line in ("a print", "INFO dmoerm.x: a library line", "UserWarning: a warning", "a C-level write",
                 "a child process", "ZeroDivisionError"):
        assert line in text, (line, text)


def test_log_to_file_restores_logging(tmp_path, monkeypatch):
    monkeypatch.delenv("DMOERM_LOG_LEVEL", raising=False)
    root = logging.getLogger()
    before = root.handlers[:], root.level
    with log_to_file(tmp_path / "v.log", verbose=True) as terminal:
        assert terminal is sys.stdout  # verbose: nothing redirected
        logging.getLogger("dmoerm.y").info("kept in the file")
    assert (root.handlers, root.level) == before
    assert "kept in the file" in (tmp_path / "v.log").read_text()
