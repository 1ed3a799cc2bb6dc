"""A run's log file: everything the process and its children write goes there, the terminal keeps what a
person reads (the stage progress, the results).

``log_to_file`` points this process's standard output and error (the file descriptors, so C extensions,
child processes such as a local Ray instance's raylet, and every later ``print`` follow) at the file,
sends the ``logging`` records and ``warnings`` there too, and yields a stream to the real terminal. With
``verbose`` (``--verbose`` or ``DMOERM_LOG_LEVEL``) nothing is redirected: the file gets the log records
and the terminal gets everything, as before.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

LOG_LEVEL_ENV = "DMOERM_LOG_LEVEL"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
QUIET = ("httpx", "urllib3", "botocore", "filelock", "transformers")
"""Loggers kept at WARNING: their INFO lines are per request or per file."""


def log_dir(storage_uri: str, output_dir: str) -> Path:
    """Where a run's log files go: ``<storage_uri>/logs`` (beside the stages, the default MLflow store, Ray
    Train's and Tune's folders), or ``<output_dir>/logs`` when the storage is remote, or ``.scratch/logs``."""
    for base in (storage_uri, output_dir):
        if base and "://" not in base:
            return Path(base) / "logs"
    return Path(".scratch") / "logs"


def log_level(verbose: bool = False) -> tuple[int, bool]:
    """The level of the run's log records and whether they go to the terminal too: ``DMOERM_LOG_LEVEL``
    (a level name: shown on the terminal), else ``verbose`` (INFO on the terminal), else INFO to the file."""
    name = os.environ.get(LOG_LEVEL_ENV, "").strip().upper()
    if not name:
        return logging.INFO, verbose
    level = logging.getLevelName(name)
    if not isinstance(level, int):
        raise ValueError(f"{LOG_LEVEL_ENV}={name!r} is not a logging level (DEBUG, INFO, WARNING, ERROR)")
    return level, True


@contextlib.contextmanager
def log_to_file(path: str | Path, verbose: bool = False) -> Iterator[TextIO]:
    """Send this process's output to ``path`` (appended) for the ``with`` block; yields the terminal's
    stream. On leaving (an exception included) the terminal gets its output back, so a failure's traceback
    is shown where the user looks."""
    level, to_terminal = log_level(verbose)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    log = open(path, "a", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115 (closed below)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    handler = logging.StreamHandler(log)
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
    root.handlers = [handler]
    if to_terminal:
        root.addHandler(logging.StreamHandler(sys.stderr))
        root.handlers[-1].setFormatter(handler.formatter)
    root.setLevel(level)
    for name in QUIET:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
    logging.captureWarnings(True)
    fds: tuple[int, int] | None = None
    terminal: TextIO = sys.stdout
    try:
        if not to_terminal:
            sys.stdout.flush()
            sys.stderr.flush()
            fds = os.dup(1), os.dup(2)
            if _writes_to_fd(sys.stdout, 1):  # else (a test's capture): keep writing the results to it
                terminal = open(os.dup(fds[0]), "w", buffering=1,  # noqa: SIM115 (closed below)
                                encoding=sys.stdout.encoding or "utf-8", errors="replace")
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
        yield terminal
    finally:
        if fds is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(fds[0], 1)
            os.dup2(fds[1], 2)
            os.close(fds[0])
            os.close(fds[1])
            if terminal is not sys.stdout:
                terminal.close()
        logging.captureWarnings(False)
        root.handlers, root.level = saved
        log.close()


def _writes_to_fd(stream: TextIO, fd: int) -> bool:
    try:
        return stream.fileno() == fd
    except (AttributeError, ValueError, OSError):  # io.UnsupportedOperation is an OSError
        return False
