"""Telemetry recording: every step and every footprint sample of a job, as compact JSON lines.

A step is a ``step`` line; the held steps a worker sent in one ``steps`` frame are one ``steps`` line, a list
per field (``leak_bytes_per_step``, ``transient`` and ``rank`` once, as after the last row). ``read_records``
gives them back as one ``step`` record per row, so readers see every step either way.
``mlxsupctl plot`` and the benchmarks read these files. A record is encoded and kept in memory; the lines are
written in one write and flushed to the OS once ``flush_every`` has passed (at the next record, or at the
daemon loop's next turn through ``flush_due``), when ``max_pending`` lines are waiting, and at close: recording
costs the poll loop a few microseconds per record and one system call a second. The file rotates by size like
the logs (about 100 MB a day per job at 20 samples a second), and readers take a bounded window of its end.
A write that fails (full or read-only disk) is reported to ``on_error``; its lines are lost, and the next
flush tries again.
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
_ENCODE = json.JSONEncoder(separators=(",", ":")).encode  # one encoder: json.dumps would build one per call


class Recorder:
    """Appends records to ``<job dir>/telemetry.jsonl`` (wall-clock time ``t`` on every line)."""

    def __init__(self, path: Path | None, flush_every: float = 1.0, on_error: OnError | None = None,
                 max_bytes: int = 50 * 2**20, keep: int = 3, max_pending: int = 4096) -> None:
        self.path = path
        self._file: IO[str] | None = None
        self._flush_every = flush_every
        self._last_flush = 0.0
        self._on_error = on_error
        self._max_bytes = max_bytes
        self._keep = keep
        self._max_pending = max_pending
        self._pending: list[str] = []

    def record(self, kind: str, **fields: Any) -> None:
        if self.path is None:
            return
        now = time.time()
        self._pending.append(_ENCODE({"t": round(now, 4), "k": kind, **fields}) + "\n")
        if now - self._last_flush >= self._flush_every or len(self._pending) >= self._max_pending:
            self.flush(now)

    def flush_due(self) -> None:
        """Flush when lines are waiting and ``flush_every`` has passed (the daemon loop calls this)."""
        if self._pending:
            now = time.time()
            if now - self._last_flush >= self._flush_every:
                self.flush(now)

    def flush(self, now: float | None = None) -> None:
        """Write the waiting lines and hand them to the OS; rotate the file once it is past ``max_bytes``."""
        if self.path is None or not self._pending:
            return
        lines, self._pending = self._pending, []
        self._last_flush = time.time() if now is None else now
        try:
            handle = self._file or self._open(self.path)
            handle.write("".join(lines))
            handle.flush()
            if self._max_bytes and handle.tell() >= self._max_bytes:
                self._rotate(self.path)
        except OSError as exc:
            self._drop()
            if self._on_error is not None:
                self._on_error("telemetry", exc)

    def _open(self, path: Path) -> IO[str]:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a")  # noqa: SIM115 - lives as long as the job
        return self._file

    def _rotate(self, path: Path) -> None:
        self._close_file()
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
        """Write what is waiting, then close the file (the next record reopens it)."""
        self.flush()
        self._close_file()

    def _close_file(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError as exc:
                if self._on_error is not None:
                    self._on_error("telemetry", exc)
            self._file = None


def expand_steps(record: dict[str, Any]) -> list[dict[str, Any]]:
    """One ``step`` record per row of a ``steps`` record (list fields by row, the others as they are; a row's
    nil in an optional field leaves it out, as a ``step`` line does). A record whose lists disagree in length
    gives nothing (a damaged line)."""
    rows = record.get("step")
    if not isinstance(rows, list | tuple):
        return []
    columns = {k: v for k, v in record.items() if isinstance(v, list | tuple)}
    if any(len(column) != len(rows) for column in columns.values()):
        return []
    shared = {k: v for k, v in record.items() if k not in columns}
    shared["k"] = "step"
    names = list(columns)
    return [{**shared, **{k: v for k, v in zip(names, values, strict=True) if v is not None}}
            for values in zip(*columns.values(), strict=True)]


def read_records(path: Path, window: int = READ_WINDOW) -> list[dict[str, Any]]:
    """The complete records in the last ``window`` bytes of a telemetry file (a torn line is skipped); a
    ``steps`` line comes back as its ``step`` records."""
    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(0, size - window))
            data = handle.read()
    except FileNotFoundError:
        return []
    if size > window:
        data = data.split(b"\n", 1)[-1]  # the first line of the window is probably cut
    records = parse_jsonl(data.decode(errors="replace"))
    return [row for r in records for row in (expand_steps(r) if r.get("k") == "steps" else (r,))]
