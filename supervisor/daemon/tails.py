"""The end of a worker's stderr.log, read boundedly: what a crashed worker said last (``supervisor.core.crashes``)."""

from __future__ import annotations

import os
from pathlib import Path

from supervisor.core.crashes import TAIL_BYTES, last_lines


def log_size(path: Path) -> int:
    """The size of a log file now (0 when it does not exist): where a new life's lines begin."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


def stderr_tail(path: Path, start: int = 0) -> tuple[str, ...]:
    """The last lines written to ``path`` after offset ``start`` (a life's own lines; the file may have been
    rotated since, then from its beginning), reading at most TAIL_BYTES. Nothing when it cannot be read."""
    try:
        with open(path, "rb") as log:
            size = os.fstat(log.fileno()).st_size
            start = start if start <= size else 0
            begin = max(start, size - TAIL_BYTES)
            log.seek(begin)
            data = log.read(size - begin)
    except OSError:
        return ()
    return last_lines(data, partial=begin > start)
