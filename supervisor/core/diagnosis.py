"""A job's diagnosis across its lives: the forensics of the current life, the last lives' verdicts, the
cache-clear tests and the censuses its worker answered. Bounded by construction (the last N of each, plus
totals); pure (``now`` passed in). It never changes a decision: the lifecycle does not read it.
"""

from __future__ import annotations

import collections
from typing import Any

from supervisor.core.clears import CacheClears, Row
from supervisor.core.forensics import LifeForensics, overall

LEAK_VERDICTS = frozenset({"arrays_retained", "cache_growth", "outside_mlx", "mixed", "unattributed"})
CHECK_EVERY = 8  # new points between verdicts for diagnose_on_leak (a fit costs about a millisecond)


class JobDiagnosis:
    """Everything ``status``, ``explain``, ``history`` and the summary say about what leaks."""

    def __init__(self, threshold: float, auto: bool = False, keep: int = 20, warmup: int = 3) -> None:
        self.threshold = threshold
        self.auto = auto  # diagnose_on_leak: ask for a census at the first leak verdict of the run
        self.warmup = warmup
        self.current: LifeForensics | None = None
        self.lives: collections.deque[dict[str, Any]] = collections.deque(maxlen=keep)
        self.lives_total = 0
        self.verdicts: collections.Counter[str] = collections.Counter()
        self.clears = CacheClears(threshold)
        self.censuses: collections.deque[dict[str, Any]] = collections.deque(maxlen=5)
        self.auto_fired = False
        self.census_asked: float | None = None  # when a census was asked for and not yet answered
        self._new_points = 0

    def _life(self, life: int, now: float) -> tuple[LifeForensics, dict[str, Any] | None]:
        """The forensics of life ``life`` (a new one ends the previous); with the ended life's entry, if any."""
        current, ended = self.current, None
        if current is None or current.life != life:
            ended = self.end()
            current = self.current = LifeForensics(life, now, self.threshold, self.warmup)
        return current, ended

    def step(self, life: int, now: float, row: Row, rows: int = 1) -> bool:
        """A step of life ``life`` (the last of ``rows`` held ones); True when diagnose_on_leak should ask for a
        census now."""
        forensics = self.current
        if forensics is None or forensics.life != life:
            forensics, _ = self._life(life, now)
        joined = forensics.observe_step(*row, rows)
        if not (joined and self.auto and not self.auto_fired):
            return False
        self._new_points += 1
        if self._new_points < CHECK_EVERY:
            return False
        self._new_points = 0
        if forensics.verdict().verdict in LEAK_VERDICTS:
            self.auto_fired = True
            return True
        return False

    def sample(self, life: int, now: float, sampled: int) -> None:
        """A complete footprint sample of life ``life`` (the per-second slope of a guard-only job)."""
        forensics, _ = self._life(life, now)
        if not forensics.per_step:
            forensics.observe_sample(now, sampled)

    def last_row(self) -> Row | None:
        return self.current.last if self.current is not None else None

    def end(self) -> dict[str, Any] | None:
        """The current life is over: its entry joins the lives (None when it measured nothing)."""
        current, self.current = self.current, None
        if current is None or (not current.per_step and not current.per_second.points):
            return None
        entry = current.entry()
        self.lives.append(entry)
        self.lives_total += 1
        self.verdicts[entry["verdict"]] += 1
        return entry

    def entries(self) -> list[dict[str, Any]]:
        """The last lives' entries, the current life's last."""
        current = [self.current.entry()] if self.current is not None else []
        return [*self.lives, *current]

    def status(self) -> dict[str, Any]:
        """The ``leak`` object of ``status``: the current life's verdict (else the last life's)."""
        if self.current is not None:
            return self.current.entry()
        return dict(self.lives[-1]) if self.lives else {"verdict": "none", "meaning": "no life measured yet"}

    def summary(self) -> dict[str, Any]:
        """``summary["leak"]``: the overall verdict, and each of the last lives with its slopes."""
        entries = self.entries()
        verdicts = collections.Counter(self.verdicts)
        if self.current is not None:
            verdicts[entries[-1]["verdict"]] += 1
        return {"overall": overall(entries, self.threshold).as_dict() if entries else
                {"verdict": "none", "meaning": "no life measured", "fixes": [], "per": "step",
                 "slopes": {}, "interval": {}},
                "lives": entries, "lives_total": self.lives_total + (self.current is not None),
                "verdicts": dict(verdicts)}
