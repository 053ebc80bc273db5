"""The cache-clear test: whenever the daemon asks a worker to clear MLX's cache, what did it release, and did
the growth go on? That answers, from the run itself, whether clearing the cache could fix its leak.

The worker clears at the first step boundary after the command reaches it, which may be a step or a few late;
the clear is the largest fall of the cache (of the footprint when the cache is not measured) among the first
``REACTION`` steps after the command was sent. The growth after it is the footprint's rise per step over the
``follow`` steps that come next (or those until the life ends; with none, the net growth across the clear
itself). Pure; bounded (the last ``keep`` tests and totals).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

from supervisor.core.sizes import format_bytes

REACTION = 4  # steps after the command within which the worker clears
Row = tuple[int, int, int | None, int | None]  # (step, footprint, active, cache)


@dataclasses.dataclass
class _Pending:
    sent_at: float
    rows: list[Row]  # the last step before the command, then the steps after it


def _memory(row: Row) -> dict[str, int | None]:
    return {"step": row[0], "footprint": row[1], "active": row[2], "cache": row[3]}


class CacheClears:
    """The cache-clear tests of one job."""

    def __init__(self, threshold: float, keep: int = 20, follow: int = 6) -> None:
        self.threshold = threshold
        self.follow = follow
        self.records: collections.deque[dict[str, Any]] = collections.deque(maxlen=keep)
        self.sent = 0  # clear_cache commands sent
        self.measured = 0
        self.released_bytes = 0
        self.went_on = 0  # tests after which growth went on
        self._pending: _Pending | None = None

    def asked(self, now: float, last: Row | None) -> None:
        """A clear_cache command went to the worker, whose last reported step was ``last``. One test at a time:
        a clear asked while one is being measured is counted, not measured."""
        self.sent += 1
        if self._pending is None and last is not None:
            self._pending = _Pending(now, [last])

    def observe(self, row: Row) -> dict[str, Any] | None:
        """A step after the command; returns the finished test once enough steps came."""
        pending = self._pending
        if pending is None or row[0] <= pending.rows[-1][0]:
            return None
        pending.rows.append(row)
        rows = pending.rows
        if len(rows) < 2:
            return None
        index = self._clear_index(rows)
        if len(rows) - 1 - index < self.follow:
            return None
        self._pending = None
        return self._finish(rows, index)

    @property
    def measuring(self) -> bool:
        """A test waits for the steps after a clear."""
        return self._pending is not None

    def flush(self) -> dict[str, Any] | None:
        """The life ended: a test still being measured finishes with the steps it has (a leaking life may end a
        few steps after its first clear), or is dropped when no step followed the clear."""
        pending, self._pending = self._pending, None
        if pending is None or len(pending.rows) < 2:
            return None
        return self._finish(pending.rows, self._clear_index(pending.rows))

    def _clear_index(self, rows: list[Row]) -> int:
        """Index of the first row after the clear: the largest fall in the first REACTION steps."""
        cache_known = all(row[3] is not None for row in rows[:REACTION + 1])
        column = 3 if cache_known else 1
        window = range(1, min(len(rows), REACTION + 1))
        return max(window, key=lambda i: (rows[i - 1][column] or 0) - (rows[i][column] or 0))

    def _finish(self, rows: list[Row], index: int) -> dict[str, Any]:
        before, after, last = rows[index - 1], rows[index], rows[-1]
        cache_known = before[3] is not None and after[3] is not None
        released = max(0, (before[3] or 0) - (after[3] or 0)) if cache_known else max(0, before[1] - after[1])
        if last is after:  # no step after the clear's: the net growth across the clear
            growth = (after[1] - before[1]) / (after[0] - before[0])
        else:
            growth = (last[1] - after[1]) / (last[0] - after[0])
        went_on = growth > self.threshold
        self.measured += 1
        self.released_bytes += released
        self.went_on += went_on
        text = f"clear_cache released {format_bytes(released)}; " + (
            f"growth went on at {format_bytes(round(growth))}/step" if went_on
            else f"growth stopped ({format_bytes(round(growth))}/step)")
        record = {"step": after[0], "released_bytes": released, "released_of": "cache" if cache_known else "footprint",
                  "growth_bytes_per_step": round(growth, 1), "went_on": went_on, "text": text,
                  "before": _memory(before), "after": _memory(after)}
        self.records.append(record)
        return record

    def summary(self) -> dict[str, Any]:
        """``summary["cache_clears"]``: totals and the last tests."""
        return {"sent": self.sent, "measured": self.measured, "released_bytes": self.released_bytes,
                "growth_went_on": self.went_on, "last": list(self.records)}
