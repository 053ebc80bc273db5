"""structlog setup: key=value lines on a terminal, JSON lines under a service manager or into a file.

With a log file the daemon rotates it by size itself (``log_max_bytes``, keeping ``log_keep`` old files) and
reopens it on SIGUSR1, for external rotators such as newsyslog or logrotate.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TextIO

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def rotate_files(path: Path, keep: int) -> None:
    """x -> x.1 -> ... -> x.keep (the oldest is dropped); ``path`` itself is gone afterwards."""
    for index in range(keep, 0, -1):
        newer = path.with_name(f"{path.name}.{index - 1}") if index > 1 else path
        if newer.exists():
            os.replace(newer, path.with_name(f"{path.name}.{index}"))
    path.unlink(missing_ok=True)


class RotatingFile:
    """A text sink that rotates by size and can be reopened; what structlog writes to."""

    def __init__(self, path: Path, max_bytes: int, keep: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", buffering=1)  # noqa: SIM115 - lives as long as the daemon

    def write(self, text: str) -> int:
        written = self._file.write(text)
        if self.max_bytes and self._file.tell() >= self.max_bytes:
            self.rotate()
        return written

    def flush(self) -> None:
        self._file.flush()

    def isatty(self) -> bool:
        return False

    def rotate(self) -> None:
        """mlxsupd.log -> mlxsupd.log.1 -> ... -> .keep (dropped), then a fresh file."""
        self._file.close()
        rotate_files(self.path, self.keep)
        self._file = open(self.path, "a", buffering=1)  # noqa: SIM115

    def reopen(self) -> None:
        """After an external rotator moved the file away."""
        self._file.close()
        self._file = open(self.path, "a", buffering=1)  # noqa: SIM115


def configure(fmt: str = "auto", level: str = "info", stream: TextIO | RotatingFile | None = None) -> None:
    """Configure structlog once for the process. ``fmt``: auto, console or json."""
    sink = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if sink.isatty() else "json"
    renderer: structlog.typing.Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False, pad_event_to=0)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.WriteLoggerFactory(file=sink),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
