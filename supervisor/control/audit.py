"""The audit trail: who asked the daemon to change what, and with which outcome.

One JSON line per state-changing control request in ``<state_dir>/audit.jsonl`` (0600), rotated by size like
the logs (``daemon.log_max_bytes``, ``log_keep``). Refused attempts (unauthenticated, revoked, forbidden) are
counted exactly and written rate-limited, so a flooding client cannot push the real records out of the
rotation. A write failure never stops the daemon: it is counted and logged once per minute.
"""

from __future__ import annotations

import collections
import os
import time
from pathlib import Path
from typing import Any

import structlog

from supervisor.daemon.history import append_jsonl, parse_jsonl
from supervisor.daemon.system import rotate_if_large

log = structlog.get_logger("mlxsupd")
MAX_TAIL_BYTES = 4 * 2**20  # `audit -n N` reads at most this much of each file
MAX_TAIL_RECORDS = 10_000
FAILURE_LOG_EVERY = 60.0  # seconds between two log lines about failing audit writes


class RateLimit:
    """At most ``burst`` events per key in each ``window`` seconds; remembers how many it held back."""

    def __init__(self, burst: int = 20, window: float = 60.0, max_keys: int = 1024) -> None:
        self.burst = burst
        self.window = window
        self.max_keys = max_keys
        self._keys: dict[tuple[str, str], list[float]] = {}  # key -> [window start, count, suppressed]

    def allow(self, key: tuple[str, str], now: float) -> tuple[bool, int]:
        """(whether to write this one, events held back in the key's previous window, to report with it)."""
        if key not in self._keys and len(self._keys) >= self.max_keys:
            self._keys = {k: v for k, v in self._keys.items() if now - v[0] < self.window}
            if len(self._keys) >= self.max_keys:
                key = (key[0], "*")  # many distinct sources at once share one budget
        state = self._keys.setdefault(key, [now, 0, 0])
        held = 0
        if now - state[0] >= self.window:
            held = int(state[2])
            state[:] = [now, 0, 0]
        state[1] += 1
        if state[1] > self.burst:
            state[2] += 1
            return False, 0
        return True, held


class AuditTrail:
    """Appends audit records; counts refusals; reads the newest records back for `mlxsupctl audit`."""

    def __init__(self, path: Path | None, max_bytes: int, keep: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self.written = 0
        self.write_failures = 0
        self.refused: collections.Counter[str] = collections.Counter()  # reason -> attempts
        self.limit = RateLimit()
        self._last_failure_log = float("-inf")

    def record(self, client: str, command: str, **fields: Any) -> None:
        """One state-changing request and its outcome (``result`` or ``error``)."""
        self._append({"time": time.time(), "client": client, "command": command, **fields})

    def refuse(self, reason: str, client: str, now: float, **fields: Any) -> None:
        """A refused attempt: always counted; logged and written at most ``burst`` times a minute per client."""
        self.refused[reason] += 1
        allowed, held = self.limit.allow((reason, client), now)
        if not allowed:
            return
        extra = {"suppressed_before": held} if held else {}
        log.warning("control_refused", reason=reason, client=client, **extra, **fields)
        self._append({"time": time.time(), "client": client, "error": reason, **extra, **fields})

    def counters(self) -> dict[str, Any]:
        return {"refused": dict(self.refused), "audit_records": self.written,
                "audit_write_failures": self.write_failures}

    def _append(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            rotate_if_large(self.path, self.max_bytes, self.keep)
            append_jsonl(self.path, record)
        except OSError as exc:  # a full or read-only state dir must not take the control plane down
            self.write_failures += 1
            now = time.monotonic()
            if now - self._last_failure_log >= FAILURE_LOG_EVERY:
                self._last_failure_log = now
                log.error("audit_write_failed", path=str(self.path), error=str(exc), failures=self.write_failures)
            return
        self.written += 1

    def tail(self, count: int) -> list[dict[str, Any]]:
        """The newest ``count`` records, oldest first, across the current file and its rotated ones."""
        if self.path is None:
            return []
        count = max(1, min(count, MAX_TAIL_RECORDS))
        records: list[dict[str, Any]] = []
        for index in range(self.keep + 1):
            path = self.path if index == 0 else self.path.with_name(f"{self.path.name}.{index}")
            records[:0] = read_tail(path)
            if len(records) >= count:
                break
        return records[-count:]


def read_tail(path: Path) -> list[dict[str, Any]]:
    """The well-formed JSON lines among the last MAX_TAIL_BYTES of a file (missing file: none)."""
    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            start = max(0, size - MAX_TAIL_BYTES)
            handle.seek(start)
            data = handle.read(MAX_TAIL_BYTES)
    except FileNotFoundError:
        return []
    text = data.decode(errors="replace")
    if start > 0:
        text = text.partition("\n")[2]  # the first line was cut by the window
    return parse_jsonl(text)
