"""Bounded records of a job's whole run: the last N of a series, and aggregates over all of it.

A daemon under launchd runs for months and a leaking job is recycled several times an hour, so nothing the
lifecycle keeps per restart, per step or per decision may grow with the run: a list shown to a reader keeps its
last N items and counts the rest; a figure (a median, a maximum) comes from a bounded window and exact running
aggregates.
"""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T")
LAST_BATCHES = 100  # batch changes listed (summary batch_history; batch_changes counts them all)
LAST_STOPS = 100  # gang stop steps listed (summary stop_steps; gang_stops counts them all)
LAST_RECOVERIES = 1024  # recovery times the median is taken over (the most recent ones)


class Recent(list[T]):
    """A list that keeps only its last ``limit`` items; ``total`` counts every item ever appended.

    It is a list (JSON, msgpack, slicing and ``==`` work as before) whose ``append`` drops the oldest item past
    ``limit``; only ``append`` is meant to add to it.
    """

    def __init__(self, limit: int) -> None:
        super().__init__()
        if limit < 1:
            raise ValueError(f"limit {limit}: must be >= 1")
        self.limit = limit
        self.total = 0

    def append(self, item: T) -> None:
        super().append(item)
        self.total += 1
        if len(self) > self.limit:
            del self[0]  # O(limit) with a small limit: cheaper than a deque's lost list semantics


class Series(Recent[float]):
    """Recent values (for a median over a bounded window) plus the exact maximum over every value."""

    def __init__(self, limit: int = LAST_RECOVERIES) -> None:
        super().__init__(limit)
        self.max: float | None = None

    def append(self, item: float) -> None:
        super().append(item)
        if self.max is None or item > self.max:
            self.max = item

    def median(self) -> float | None:
        """The upper median of the recent values (the element at len // 2 of them sorted); None when empty."""
        if not self:
            return None
        ordered = sorted(self)
        return ordered[len(ordered) // 2]
