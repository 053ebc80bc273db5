"""Telemetry recording: every step and every footprint sample of a job, as compact JSON lines.

``mlxsupctl plot`` and the benchmarks read these files. Writes are buffered and flushed at most once a
second, so recording costs the poll loop a few microseconds per record.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import IO, Any

from supervisor.daemon.history import read_jsonl


class Recorder:
    """Appends records to ``<job dir>/telemetry.jsonl`` (wall-clock time ``t`` on every line)."""

    def __init__(self, path: Path | None, flush_every: float = 1.0) -> None:
        self.path = path
        self._file: IO[str] | None = None
        self._flush_every = flush_every
        self._last_flush = 0.0
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", buffering=1 << 16)  # noqa: SIM115 - lives as long as the job

    def record(self, kind: str, **fields: Any) -> None:
        if self._file is None:
            return
        now = time.time()
        self._file.write(json.dumps({"t": round(now, 4), "k": kind, **fields}, separators=(",", ":")) + "\n")
        if now - self._last_flush >= self._flush_every:
            self._file.flush()
            self._last_flush = now

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_records(path: Path) -> list[dict[str, Any]]:
    """All complete records of a telemetry file (a torn last line is skipped)."""
    return read_jsonl(path)
