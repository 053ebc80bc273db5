"""Telemetry recording: every step and every footprint sample of a job, as compact JSON lines.

``mlxsupctl plot`` and the benchmarks read these files. Writes are buffered and flushed at most once a
second, so recording costs the poll loop a few microseconds per record. The file rotates by size like the
logs (about 100 MB a day per job at 20 samples a second), and readers take a bounded window of its end.
A write that fails (full or read-only disk) is reported to ``on_error`` and retried with the next record.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from supervisor.daemon.history import parse_jsonl
from supervisor.daemon.logs import rotate_files

OnError = Callable[[str, OSError], None]
READ_WINDOW = 32 * 2**20  # bytes of a telemetry file's end that readers take


class Recorder:
    """Appends records to ``<job dir>/telemetry.jsonl`` (wall-clock time ``t`` on every line)."""

    def __init__(self, path: Path | None, flush_every: float = 1.0, on_error: OnError | None = None,
                 max_bytes: int = 50 * 2**20, keep: int = 3) -> None:
        self.path = path
        self._file: IO[str] | None = None
        self._flush_every = flush_every
        self._last_flush = 0.0
        self._on_error = on_error
        self._max_bytes = max_bytes
        self._keep = keep

    def record(self, kind: str, **fields: Any) -> None:
        if self.path is None:
            return
        now = time.time()
        line = json.dumps({"t": round(now, 4), "k": kind, **fields}, separators=(",", ":")) + "\n"
        try:
            handle = self._file or self._open(self.path)
            handle.write(line)
            if now - self._last_flush >= self._flush_every:
                handle.flush()
                self._last_flush = now
                if self._max_bytes and handle.tell() >= self._max_bytes:
                    self._rotate(self.path)
        except OSError as exc:
            self._drop()
            if self._on_error is not None:
                self._on_error("telemetry", exc)

    def _open(self, path: Path) -> IO[str]:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", buffering=1 << 16)  # noqa: SIM115 - lives as long as the job
        return self._file

    def _rotate(self, path: Path) -> None:
        self.close()
        rotate_files(path, self._keep)

    def _drop(self) -> None:
        """Forget the file after a failed write; the buffered lines are lost, the next record reopens it."""
        handle, self._file = self._file, None
        if handle is not None:
            try:
                handle.close()
            except OSError:
                pass

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError as exc:
                if self._on_error is not None:
                    self._on_error("telemetry", exc)
            self._file = None


def read_records(path: Path, window: int = READ_WINDOW) -> list[dict[str, Any]]:
    """The complete records in the last ``window`` bytes of a telemetry file (a torn line is skipped)."""
    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(0, size - window))
            data = handle.read()
    except FileNotFoundError:
        return []
    if size > window:
        data = data.split(b"\n", 1)[-1]  # the first line of the window is probably cut
    return parse_jsonl(data.decode(errors="replace"))
