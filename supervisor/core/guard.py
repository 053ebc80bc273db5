"""The decisions of a guard-only life (a command that never said hello), in its own terms: pure functions.

A guard-only worker has no steps, batch or checkpoint; the daemon knows only its sampled footprint. So its
growth is a rate per second (Theil-Sen over the life's last samples, the same sliding estimator the SDK's
per-step slope uses) and a breach is a ``leak`` (growth over ``PolicyConfig.leak_rate``), with the time a fresh
start takes to reach the budget at that rate, or a ``spike`` (the footprint jumped). At the budget the group gets
SIGTERM (``Action.TERMINATE``), at the kill ceiling SIGKILL (``Action.KILL``), under the system floor SIGTERM.
"""

from __future__ import annotations

import math
from typing import Any

from supervisor.core.policy import NOTHING, Action, Decision, Diagnosis, Limits, PolicyConfig, SlidingTheilSen
from supervisor.core.sizes import format_bytes

GROWTH_GRID = 0.25  # seconds: the trend takes at most one sample per grid interval, so that the faster
# sampling near the budget does not outweigh the life before it (a sudden jump is then a few points, not most)
GROWTH_WINDOW = 96  # points in the growth window: the last 24 s or more


class SampleTrend:
    """Growth per second of one life's complete samples (Theil-Sen over the last ``window`` points, one per
    ``grid`` seconds at most)."""

    def __init__(self, window: int = GROWTH_WINDOW, grid: float = GROWTH_GRID) -> None:
        self._trend = SlidingTheilSen(window)  # points: (milliseconds, bytes); integers, as for steps
        self.grid = grid
        self.first_at: float | None = None
        self.last_at = -math.inf
        self.lowest = 0  # the life's smallest sample: where a fresh start begins

    def add(self, now: float, sampled: int) -> None:
        if self.first_at is None:
            self.first_at, self.lowest = now, sampled
        self.lowest = min(self.lowest, sampled)
        if now - self.last_at >= self.grid - 1e-9:
            self.last_at = now
            self._trend.add(round(now * 1000), sampled)

    @property
    def rate(self) -> float:
        """Bytes per second (0 under 4 samples)."""
        return self._trend.slope * 1000

    def seconds_to(self, level: int, target: int) -> float:
        """Seconds from ``level`` to ``target`` at this rate (inf when not growing; 0 when already there)."""
        if level >= target:
            return 0.0
        rate = self.rate
        return (target - level) / rate if rate > 0 else math.inf

    def span(self, now: float) -> float:
        """Seconds since the life's first sample."""
        return now - self.first_at if self.first_at is not None else 0.0


def rate_words(rate: float) -> str:
    return f"{format_bytes(round(rate))}/s"


def guard_on_sample(sampled: int, complete: bool, over_count: int, limits: Limits, trend: SampleTrend,
                    config: PolicyConfig, now: float) -> tuple[Decision, int]:
    """Decide on one sample of a guard-only life; returns the decision and the new consecutive-over count.
    The warn band asks nothing (there is no cache to clear through a worker that does not listen)."""
    if not complete and sampled < limits.kill:
        return NOTHING, over_count  # a partial sum only under-counts
    if sampled >= limits.kill:
        reason = (f"sample {format_bytes(sampled)} >= kill ceiling {format_bytes(limits.kill)}; "
                  f"{growth_words(trend, limits, config, now)}")
        return Decision(Action.KILL, Diagnosis.KILL_CEILING, reason), 0
    if sampled < limits.budget:
        return NOTHING, 0
    over_count += 1
    if over_count < config.consecutive_over:
        return NOTHING, over_count
    if trend.rate > config.leak_rate:
        return Decision(Action.TERMINATE, Diagnosis.LEAK, growth_words(trend, limits, config, now)), over_count
    reason = (f"spike: sample {format_bytes(sampled)} >= budget {format_bytes(limits.budget)} with growth of "
              f"{rate_words(trend.rate)} (leak threshold {rate_words(config.leak_rate)})")
    return Decision(Action.TERMINATE, Diagnosis.SPIKE, reason), over_count


def growth_words(trend: SampleTrend, limits: Limits, config: PolicyConfig, now: float) -> str:
    """The growth in words: a leak with the time a fresh start takes to the budget, or the rate alone."""
    rate = trend.rate
    if rate <= config.leak_rate:
        return f"growth {rate_words(rate)} (under the leak threshold {rate_words(config.leak_rate)})"
    return (f"leak {rate_words(rate)} over {trend.span(now):.1f} s of samples: from "
            f"{format_bytes(trend.lowest)} the budget {format_bytes(limits.budget)} is reached in "
            f"{trend.seconds_to(trend.lowest, limits.budget):.1f} s")


def floor_decision(available: int, floor: int) -> Decision:
    """Available system memory under the floor: SIGTERM (it cannot checkpoint and wait)."""
    reason = f"available {format_bytes(available)} < system floor {format_bytes(floor)}"
    return Decision(Action.TERMINATE, Diagnosis.SYSTEM_FLOOR, reason)


def guard_numbers(trend: SampleTrend, limits: Limits, last: int, now: float) -> dict[str, Any]:
    """The growth numbers of a guard-only life for its decisions and status: the rate, how long the life has
    been sampled, and when the budget would be crossed at this rate from the last sample (None: not growing)."""
    crossing = trend.seconds_to(last, limits.budget)
    return {"growth_bytes_per_second": round(trend.rate), "sampled_seconds": round(trend.span(now), 3),
            "budget_in_seconds": round(crossing, 3) if math.isfinite(crossing) else None}
