"""What a person sees while a pipeline runs: one line per stage (name, status, time).

The executors call ``start(stage)`` and ``finish(stage, status, seconds)`` around every stage, from
whatever thread or order the stages run in (concurrent stages included). On a terminal the view is live:
finished stages stay as lines, and below them every running stage ticks its elapsed time, with a progress
bar over each group of concurrent stages (``start(stage, group=...)``: phase 1 and the baseline, the
experts). Elsewhere (CI logs, a file, a pipe) every event is one plain line, nothing redrawn.

    with StageProgress() as progress:
        progress.start("data")
        ...
        progress.finish("data", "done", 1.2)
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Literal, TextIO

Status = Literal["done", "skipped", "failed"]
STATUS_TEXT = {"done": "done", "skipped": "skipped (finished earlier)", "failed": "FAILED"}
NAME_WIDTH = 30


def format_seconds(seconds: float) -> str:
    """``4.2 s``, ``3:07``, ``1:02:09``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _bar(done: int, total: int, width: int, fancy: bool) -> str:
    full, empty = ("\u2588", "\u2591") if fancy else ("#", "-")
    n = round(width * done / total) if total else width
    return full * n + empty * (width - n)


@dataclass
class _Stage:
    name: str
    group: str | None
    started: float
    seconds: float | None = None
    status: Status | None = None


class StageProgress:
    """A stage-by-stage view of one run on ``stream`` (default: standard output).

    ``live``: redraw the running stages in place (default: when ``stream`` is a terminal);
    ``enabled=False``: show nothing (the executors' default, so library callers opt in)."""

    def __init__(self, stream: TextIO | None = None, live: bool | None = None, enabled: bool = True,
                 refresh_s: float = 0.5) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.enabled = enabled
        self.live = enabled and (_isatty(self.stream) if live is None else live)
        self.fancy = "utf" in (getattr(self.stream, "encoding", None) or "").lower()
        self.stages: dict[str, _Stage] = {}
        self.t0 = time.monotonic()
        self._lock = threading.RLock()
        self._drawn = 0  # lines of the live block now on screen
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self._refresh_s = refresh_s

    # ---- events -------------------------------------------------------------------------------
    def start(self, stage: str, group: str | None = None) -> None:
        """``stage`` began (``group``: the concurrent stages it runs with, shown under one bar)."""
        if not self.enabled:
            return
        with self._lock:
            self.stages[stage] = _Stage(stage, group, time.monotonic())
            if self.live:
                self._ensure_ticker()
                self._redraw([])
            else:
                self._write(self._line(stage, "started") + "\n")

    def finish(self, stage: str, status: Status, seconds: float | None = None) -> None:
        """``stage`` ended with ``status`` after ``seconds`` (default: since its ``start``)."""
        if status not in STATUS_TEXT:
            raise ValueError(f"StageProgress.finish({stage!r}): status {status!r} is not one of {list(STATUS_TEXT)}")
        if not self.enabled:
            return
        with self._lock:
            now = time.monotonic()
            s = self.stages.setdefault(stage, _Stage(stage, None, now - (seconds or 0.0)))
            s.seconds = now - s.started if seconds is None else float(seconds)
            s.status = status
            line = self._line(stage, f"{STATUS_TEXT[status]:<27} {format_seconds(s.seconds):>8}")
            if self.live:
                self._redraw([line])
            else:
                self._write(line + "\n")

    def close(self) -> None:
        """Stop the live view (the running stages' lines are cleared) and print the total time."""
        if not self.enabled:
            return
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        with self._lock:
            if self.live:
                self._redraw([])
            done = sum(s.status is not None for s in self.stages.values())
            self._write(f"{done} stages in {format_seconds(time.monotonic() - self.t0)}\n")
            self.enabled = False

    def __enter__(self) -> StageProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- rendering ----------------------------------------------------------------------------
    def _line(self, stage: str, text: str) -> str:
        stamp = "" if self.live else f"[{format_seconds(time.monotonic() - self.t0):>8}] "
        return f"{stamp}{stage:<{NAME_WIDTH}} {text}"

    def _block(self) -> list[str]:
        """The live block: a bar per group of concurrent stages, then every running stage's elapsed time."""
        now = time.monotonic()
        running = [s for s in self.stages.values() if s.status is None]
        lines = []
        for group in dict.fromkeys(s.group for s in running if s.group):
            members = [s for s in self.stages.values() if s.group == group]
            done = sum(s.status is not None for s in members)
            start = min(s.started for s in members)
            lines.append(f"{group:<{NAME_WIDTH}} {_bar(done, len(members), 24, self.fancy)} {done}/{len(members)}"
                         f"  {format_seconds(now - start):>8}")
        spin = "|/-\\"[int(now / self._refresh_s) % 4]
        for s in running:
            lines.append(f"{'  ' if s.group else ''}{s.name:<{NAME_WIDTH - (2 if s.group else 0)}} "
                         f"running {spin}{'':<17} {format_seconds(now - s.started):>8}")
        lines.append(f"elapsed {format_seconds(now - self.t0)}")
        width = _width(self.stream)
        return [x[: width - 1] for x in lines]

    def _redraw(self, finished: list[str]) -> None:
        """Clear the live block, print ``finished`` lines above it for good, draw the block again."""
        out = (f"\x1b[{self._drawn}F" if self._drawn else "\r") + "\x1b[J"
        block = self._block() if not self._stop.is_set() else []
        out += "".join(x + "\n" for x in finished + block)
        self._drawn = len(block)
        self._write(out)

    def _ensure_ticker(self) -> None:
        if self._ticker is None:
            self._ticker = threading.Thread(target=self._tick, name="stage-progress", daemon=True)
            self._ticker.start()

    def _tick(self) -> None:
        while not self._stop.wait(self._refresh_s):
            with self._lock:
                if any(s.status is None for s in self.stages.values()):
                    self._redraw([])

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _width(stream: TextIO) -> int:
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):
        columns = 0
    return columns if columns > 0 else 100  # a pseudo-terminal may report no size
