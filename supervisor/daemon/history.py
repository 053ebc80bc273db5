"""Job history: an append-only JSON-lines file per job that survives daemon restarts.

One line per event (start, exit, breach, decision, batch change, checkpoint). A torn last line (the daemon
died mid-write) is skipped on read, never fatal. A write that fails (full or read-only disk) is reported to
``on_error``; the event stays in memory.

The file rotates by size like the daemon's other files (``daemon.log_max_bytes``, keeping ``log_keep`` old files:
history.jsonl -> history.jsonl.1 -> ...). The daemon keeps the last ``limit`` events in memory, reads only that
tail of the files at start (from the end, so start time does not grow with the history) and reads further back
across the rotated files only when asked for more (``mlxsupctl history -n``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from supervisor.daemon.logs import rotate_files

OnError = Callable[[str, OSError], None]
KEPT = 200  # events of a job kept in memory (resume after a daemon restart, the history command up to this many)
MOST = 10_000  # events the history command reads back at most
CHUNK = 64 * 1024  # bytes read at a time from a file's end
MAX_ROTATED = 1000  # rotated files looked for past history.jsonl.1 (a bound on a loop over names, never reached)


class History:
    """Events of one job: the last ``limit`` in memory, all of them (within rotation) on disk."""

    def __init__(self, path: Path | None, limit: int = KEPT, on_error: OnError | None = None,
                 max_bytes: int = 0, keep: int = 3) -> None:
        self.path = path
        self.limit = limit
        self.max_bytes = max_bytes
        self.keep = keep
        self.events: list[dict[str, Any]] = []
        self._on_error = on_error
        self._size = 0
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                self.events = read_recent(path, limit)
                self._size = path.stat().st_size if path.exists() else 0
            except OSError as exc:
                self._failed(exc)

    def record(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"time": time.time(), "event": kind, **fields}
        self.events.append(event)
        if len(self.events) > self.limit:
            del self.events[: len(self.events) - self.limit]
        if self.path is not None:
            try:
                self._size += append_jsonl(self.path, event)
                if self.max_bytes and self._size >= self.max_bytes:
                    rotate_files(self.path, self.keep)
                    self._size = 0
            except OSError as exc:
                self._failed(exc)
        return event

    def recent(self, count: int) -> list[dict[str, Any]]:
        """The last ``count`` events (at most ``MOST``): from memory, or from the files when more are wanted."""
        count = max(1, min(count, MOST))
        if count <= len(self.events) or self.path is None:
            return self.events[-count:]
        try:
            found = read_recent(self.path, count)
        except OSError as exc:
            self._failed(exc)
            return self.events[-count:]
        return found if len(found) > len(self.events) else self.events[-count:]

    def _failed(self, exc: OSError) -> None:
        if self._on_error is not None:
            self._on_error("history", exc)


def append_jsonl(path: Path, event: dict[str, Any]) -> int:
    """Append one JSON line (file created 0600); the bytes written; OSError when it cannot be written."""
    line = (json.dumps(event, default=str, separators=(",", ":")) + "\n").encode()
    # O_APPEND + one write per line: concurrent readers never see half a line from us.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        return os.write(fd, line)
    finally:
        os.close(fd)


def rotated(path: Path) -> list[Path]:
    """``path`` and its rotated files that exist, newest first (path, path.1, path.2, ...)."""
    found = [path] if path.exists() else []
    for index in range(1, MAX_ROTATED + 1):
        older = path.with_name(f"{path.name}.{index}")
        if not older.exists():
            break
        found.append(older)
    return found


def read_recent(path: Path, count: int) -> list[dict[str, Any]]:
    """The last ``count`` well-formed events of a history, oldest first, reading from the end of ``path`` and
    then of its rotated files only as far back as needed."""
    events: list[dict[str, Any]] = []
    for file in rotated(path):
        older = [e for line in _lines_backwards(file, count - len(events)) if (e := _event(line)) is not None]
        events = older[::-1] + events
        if len(events) >= count:
            break
    return events[-count:] if count > 0 else []


def _lines_backwards(path: Path, wanted: int) -> Iterator[bytes]:
    """Up to ``wanted`` non-empty lines of ``path``, last first, reading ``CHUNK`` bytes at a time from its end."""
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed below; a generator's with would outlive a break
    except FileNotFoundError:
        return
    try:
        position = handle.seek(0, os.SEEK_END)
        rest = b""
        given = 0
        while position > 0 and given < wanted:
            step = min(CHUNK, position)
            position -= step
            handle.seek(position)
            lines = (handle.read(step) + rest).split(b"\n")
            rest = lines.pop(0)  # perhaps the end of a line that starts in the previous chunk
            for line in reversed(lines):
                if line.strip() and given < wanted:
                    given += 1
                    yield line
        if rest.strip() and given < wanted:
            yield rest
    finally:
        handle.close()


def _event(line: bytes) -> dict[str, Any] | None:
    try:
        event = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return event if isinstance(event, dict) else None


def read_history(path: Path) -> list[dict[str, Any]]:
    """All well-formed events of a history, its rotated files first (oldest first; missing file: none)."""
    return [event for file in reversed(rotated(path)) for event in read_jsonl(file)]


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
