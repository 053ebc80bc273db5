"""Job history: an append-only JSON-lines file per job that survives daemon restarts.

One line per event (start, exit, breach, decision, batch change, checkpoint). A torn last line (the daemon
died mid-write) is skipped on read, never fatal. A write that fails (full or read-only disk) is reported to
``on_error``; the event stays in memory.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

OnError = Callable[[str, OSError], None]


class History:
    """Events of one job, in memory and on disk."""

    def __init__(self, path: Path | None, limit: int = 10_000, on_error: OnError | None = None) -> None:
        self.path = path
        self.limit = limit
        self.events: list[dict[str, Any]] = []
        self._on_error = on_error
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                self.events = read_history(path)[-limit:]
            except OSError as exc:
                self._failed(exc)

    def record(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"time": time.time(), "event": kind, **fields}
        self.events.append(event)
        if len(self.events) > self.limit:
            del self.events[: len(self.events) - self.limit]
        if self.path is not None:
            try:
                append_jsonl(self.path, event)
            except OSError as exc:
                self._failed(exc)
        return event

    def _failed(self, exc: OSError) -> None:
        if self._on_error is not None:
            self._on_error("history", exc)


def append_jsonl(path: Path, event: dict[str, Any]) -> None:
    """Append one JSON line (file created 0600); OSError when it cannot be written."""
    line = json.dumps(event, default=str, separators=(",", ":")) + "\n"
    # O_APPEND + one write per line: concurrent readers never see half a line from us.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def read_history(path: Path) -> list[dict[str, Any]]:
    """All well-formed events of a history file (missing file: none)."""
    return read_jsonl(path)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every JSON object line of a file; torn or foreign lines are skipped, a missing file is empty."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return []
    return parse_jsonl(text)


def parse_jsonl(text: str) -> list[dict[str, Any]]:
    """Every JSON object line of ``text``; torn or foreign lines are skipped."""
    events = []
    for line in text.splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(event, dict):
            events.append(event)
    return events
