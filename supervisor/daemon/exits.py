"""Exits that wait for the worker's last frames.

A worker that leaves sends its last frames (held steps, ``checkpoint_saved``, ``goodbye``) and exits at once; the
SDK's socket lingers until libzmq has handed them over, but the daemon's socket may deliver them a little after
the daemon has seen the exit. An SDK worker that exited cleanly (0 or 75) without a goodbye the daemon has read
yet is therefore kept here, for at most ``EXIT_GRACE`` seconds, while the loop goes on serving the socket and every
other job; its exit reaches the lifecycle as soon as its goodbye is read, or when the grace is over (then without
one). Nothing blocks: the job's ``next_deadline`` includes the grace's end, so the loop's poll wakes for it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

__all__ = ["EXIT_GRACE", "PendingExits"]

EXIT_GRACE = 0.5  # seconds an exit waits for its worker's goodbye
ProcKey = tuple[int, int]  # (life, rank)


class PendingExits:
    """Exited worker processes whose exit is not yet handed to the lifecycle: key -> (exit code, deadline)."""

    def __init__(self, grace: float = EXIT_GRACE) -> None:
        self.grace = grace
        self._waiting: dict[ProcKey, tuple[int, float]] = {}

    def __bool__(self) -> bool:
        return bool(self._waiting)

    def __contains__(self, key: object) -> bool:
        return key in self._waiting

    def hold(self, key: ProcKey, code: int, now: float) -> None:
        """Keep the exit of ``key`` (status ``code``, seen at ``now``) until its frames are read or the grace ends."""
        self._waiting.setdefault(key, (code, now + self.grace))

    def due(self, now: float, waiting: Callable[[ProcKey, int], bool]) -> list[tuple[ProcKey, int, bool]]:
        """The exits to act on now, oldest first, as (key, code, heard): those whose frames arrived (``waiting``
        says no more) and those whose grace is over (heard: False). They are forgotten here."""
        ready = []
        for key, (code, deadline) in sorted(self._waiting.items(), key=lambda item: item[1][1]):
            heard = not waiting(key, code)
            if heard or now >= deadline:
                del self._waiting[key]
                ready.append((key, code, heard))
        return ready

    def deadline(self) -> float:
        """When the next grace ends (inf when no exit waits)."""
        return min((deadline for _, deadline in self._waiting.values()), default=math.inf)
