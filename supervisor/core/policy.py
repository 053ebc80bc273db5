"""The supervisor's decisions as pure functions: numbers in, a decision out. No I/O, no clock reads.

The estimator turns one worker life's telemetry into a baseline, a leak slope (Theil-Sen, robust to noise)
and a per-step transient; ``on_sample`` and ``on_step`` map those plus the latest sample to an action, and
``plan_restart`` picks the next batch x accumulation.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import math
import statistics
from bisect import bisect_left, insort
from collections import deque
from collections.abc import Sequence

MiB = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class Limits:
    """The escalation bands of one job, in bytes: warn < budget < kill."""

    warn: int
    budget: int
    kill: int


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    """Tunables of the policy (see the config reference for each)."""

    leak_threshold: float = 1.0 * MiB  # bytes/step above which growth is a leak
    leak_rate: float = 1.0 * MiB  # bytes/second above which a guard-only life's growth is a leak
    warmup_steps: int = 3  # steps ignored at the start of a life (compile, allocator warm-up)
    window: int = 24  # steps in the slope window
    checkpoint_steps: int = 2  # steps of headroom a checkpoint-and-exit needs (at least 2)
    reaction_seconds: float = 0.1  # a step's telemetry to the worker reading the command (wakeup, decision, send)
    consecutive_over: int = 2  # samples at/over budget before acting
    shrink_factor: float = 0.5
    min_batch: int = 1
    max_batch: int = 8  # the configured batch: regrowth never goes past it
    keep_effective_batch: bool = True
    min_steps_per_life: int = 10  # recycles more often than this: shrink as well
    regrow_after_steps: int = 50  # healthy steps before trying a larger batch
    regrow_headroom: float = 0.75  # projected peak at 2x batch must stay under this fraction of budget
    adaptive: bool = True  # False: the original shrink-only plan (every breach halves the batch)


class Action(enum.Enum):
    NONE = "none"
    CLEAR_CACHE = "clear_cache"
    CHECKPOINT_EXIT = "checkpoint_exit"
    KILL = "kill"
    TERMINATE = "terminate"  # SIGTERM to a guard-only life's group (it cannot checkpoint)


class Diagnosis(enum.Enum):
    LEAK = "leak"
    PEAK = "peak"
    LEAK_PREDICTED = "leak_predicted"
    REGROW = "regrow"
    KILL_CEILING = "kill_ceiling"
    SYSTEM_FLOOR = "system_floor"
    SPIKE = "spike"  # a guard-only life over its budget without a leak's growth


@dataclasses.dataclass(frozen=True)
class Decision:
    """What to do now, why, and the numbers behind it."""

    action: Action
    diagnosis: Diagnosis | None = None
    reason: str = ""
    next_batch: int = 0  # for CHECKPOINT_EXIT/KILL: the batch to restart with (0: unchanged)
    next_accum: int = 0

    @property
    def acts(self) -> bool:
        return self.action is not Action.NONE


NOTHING = Decision(Action.NONE)


class Estimator:
    """Online estimates over one worker life: baseline, leak slope and per-step transient."""

    def __init__(self, config: PolicyConfig) -> None:
        self.config = config
        self._trend = SlidingTheilSen(config.window)
        self.levels = self._trend.points  # (step, end-of-step footprint), the slope window
        self.transients: deque[int] = deque(maxlen=config.window)
        self.durations: deque[float] = deque(maxlen=config.window)  # seconds per step, as the worker timed them
        self.steps_seen = 0
        self.baseline: int | None = None
        self.step_peak = 0  # highest sample since the last step ended

    def observe_sample(self, sampled: int) -> None:
        self.step_peak = max(self.step_peak, sampled)

    def observe_step(self, step: int, level: int, reported_transient: int = 0, seconds: float = 0.0) -> None:
        """Record the footprint at the end of ``step``, with the in-step excursion: the larger of what the
        samples saw and what the worker reported (MLX's per-step peak over its active memory), and how long the
        step took (0: not timed)."""
        self.steps_seen += 1
        if self.steps_seen > self.config.warmup_steps:
            self._trend.add(step, level)
            if seconds > 0:
                self.durations.append(seconds)
            self.transients.append(max(0, self.step_peak - level, reported_transient))
            if self.baseline is None or level < self.baseline:
                self.baseline = level
        self.step_peak = level

    def observe_steps(self, steps: Sequence[int], levels: Sequence[int], reported: Sequence[int],
                      seconds: Sequence[float]) -> None:
        """Several held steps at once (a ``steps`` frame), in bulk: every row counts for ``steps_seen``, the
        baseline, and the transient and duration windows, but only the last row joins the slope window, so a
        frame costs about what one step does. Held steps are calm (far from the bands, by the worker's test), so
        the trend loses nothing it needs: its window spans more steps while they are held, and every step again
        once they are not. A sample taken while the rows ran counts against the first row, as one by one, and
        against the last row's level as well (when it was taken is unknown)."""
        if self.steps_seen < self.config.warmup_steps:
            for row in zip(steps, levels, reported, seconds, strict=True):  # rare: a frame across the warmup
                self.observe_step(*row)
            return
        window = self.config.window
        self.steps_seen += len(steps)
        self._trend.add(steps[-1], levels[-1])
        self.durations.extend(filter((0.0).__lt__, seconds))  # the timed rows; the deque keeps the last window
        tail = levels[-window - 1:]
        later = reported[len(reported) - len(tail) + 1:]  # what the worker reported for tail[1:]
        drops = [max(0, before - after, r) for (before, after), r in zip(itertools.pairwise(tail), later, strict=True)]
        if len(levels) <= window:  # the first row follows the last step seen before the frame
            drops.insert(0, max(0, self.step_peak - levels[0], reported[0]))
        drops[-1] = max(drops[-1], self.step_peak - levels[-1])
        self.transients.extend(drops)
        lowest = min(levels)
        if self.baseline is None or lowest < self.baseline:
            self.baseline = lowest
        self.step_peak = levels[-1]

    @property
    def slope(self) -> float:
        """Theil-Sen slope of footprint vs step, bytes/step; 0 until there are enough points."""
        return self._trend.slope

    @property
    def transient(self) -> int:
        """Largest recent per-step excursion above the end-of-step level."""
        return max(self.transients, default=0)

    @property
    def level(self) -> int:
        return self.levels[-1][1] if self.levels else 0

    @property
    def late_steps(self) -> int:
        """Steps the worker takes between sending a step's telemetry and reading the command it caused: one
        (it reads commands at its next boundary), or as many as fit in ``reaction_seconds`` when steps are
        faster than the daemon reacts (median step time of the window, so one slow step does not count)."""
        if not self.durations:
            return 1
        step_seconds = statistics.median(self.durations)
        return max(1, math.ceil(self.config.reaction_seconds / step_seconds))

    def steps_to_breach(self, budget: int) -> float:
        """Steps until the leak trend plus the transient reach ``budget`` (inf when not leaking)."""
        slope = self.slope
        if slope <= self.config.leak_threshold:
            return float("inf")
        return (budget - self.level - self.transient) / slope


class SlidingTheilSen:
    """``theil_sen`` of the last ``window`` points, kept current as points arrive.

    Recomputing it means all window*(window-1)/2 pairwise slopes and a sort on every step (276 slopes for 24
    points). Here the slopes stay sorted: a new point inserts its slopes to the others, the point it pushes out
    of the window removes its own, so a step costs 2*(window-1) slopes and binary searches. Each slope is
    computed by the same expression, pair for pair, as ``theil_sen``, so the median is bit for bit the same.
    """

    def __init__(self, window: int) -> None:
        self.points: deque[tuple[int, int]] = deque(maxlen=window)
        self._slopes: list[float] = []  # sorted

    def add(self, step: int, level: int) -> None:
        points, slopes = self.points, self._slopes
        full = len(points) == points.maxlen
        if full:  # the first point leaves the window with its slopes
            first_step, first_level = points[0]
            for other_step, other_level in itertools.islice(points, 1, None):
                if other_step != first_step:
                    del slopes[bisect_left(slopes, (other_level - first_level) / (other_step - first_step))]
        for other_step, other_level in itertools.islice(points, 1 if full else 0, None):
            if other_step != step:
                insort(slopes, (level - other_level) / (step - other_step))
        points.append((step, level))

    @property
    def slope(self) -> float:
        """The median pairwise slope, as ``statistics.median`` takes it; 0 under 4 points or without a pair."""
        slopes, count = self._slopes, len(self._slopes)
        if len(self.points) < 4 or not count:
            return 0.0
        middle = count // 2
        return slopes[middle] if count % 2 else (slopes[middle - 1] + slopes[middle]) / 2


def theil_sen(points: list[tuple[int, int]]) -> float:
    """Median of pairwise slopes: robust to a few outliers (a cache clear, a sampling hiccup)."""
    if len(points) < 4:
        return 0.0
    slopes = [(b[1] - a[1]) / (b[0] - a[0]) for i, a in enumerate(points) for b in points[i + 1 :] if b[0] != a[0]]
    return statistics.median(slopes) if slopes else 0.0


def on_sample(
    sampled: int, complete: bool, over_count: int, limits: Limits, estimator: Estimator, batch: int, accum: int,
    config: PolicyConfig,
) -> tuple[Decision, int]:
    """Decide on one footprint sample; returns the decision and the new consecutive-over-budget count."""
    if not complete and sampled < limits.kill:
        return NOTHING, over_count  # a partial sum only under-counts: alone it acts only over the kill ceiling
    if sampled >= limits.kill:
        shrink = diagnose_breach(estimator, batch, accum, config)
        reason = f"sample {sampled} >= kill ceiling {limits.kill}"
        return Decision(Action.KILL, Diagnosis.KILL_CEILING, reason, shrink.next_batch, shrink.next_accum), 0
    if sampled >= limits.budget:
        over_count += 1
        if over_count >= config.consecutive_over:
            return diagnose_breach(estimator, batch, accum, config), over_count
        return NOTHING, over_count
    if sampled >= limits.warn:
        return Decision(Action.CLEAR_CACHE, None, f"sample {sampled} >= warn {limits.warn}"), 0
    return NOTHING, 0


def diagnose_breach(estimator: Estimator, batch: int, accum: int, config: PolicyConfig) -> Decision:
    """A breach: LEAK (recycle, same batch) or PEAK (shrink, keep the effective batch)."""
    slope = estimator.slope
    leaking = slope > config.leak_threshold
    short_life = estimator.steps_seen < config.min_steps_per_life
    if config.adaptive and leaking and not short_life:
        reason = f"leak {slope / MiB:.1f} MiB/step over {estimator.steps_seen} steps; recycling at batch {batch}"
        return Decision(Action.CHECKPOINT_EXIT, Diagnosis.LEAK, reason, batch, accum)
    next_batch, next_accum = shrink(batch, accum, config)
    transient = estimator.transient or max(0, estimator.step_peak - estimator.level)
    if not leaking:
        why = f"peak (transient {transient} B/step)"
    else:
        why = "leak (non-adaptive policy)" if not config.adaptive else "leak with too little headroom"
    reason = f"{why}; batch {batch}x{accum} -> {next_batch}x{next_accum}"
    return Decision(Action.CHECKPOINT_EXIT, Diagnosis.PEAK, reason, next_batch, next_accum)


def on_step(
    estimator: Estimator, limits: Limits, batch: int, accum: int, healthy_steps: int, config: PolicyConfig
) -> Decision:
    """Decide after a step: recycle before a predicted leak breach, or regrow a shrunken batch."""
    if not config.adaptive:
        return NOTHING
    to_breach = estimator.steps_to_breach(limits.budget)
    # The command lands late_steps late: the next boundary, or later when steps are faster than the daemon.
    # (Not leaking, to_breach is inf: skip late_steps, a median over the window, on every step.)
    if to_breach < math.inf and to_breach <= config.checkpoint_steps + estimator.late_steps:
        reason = f"leak {estimator.slope / MiB:.1f} MiB/step reaches budget in {to_breach:.1f} steps"
        if estimator.steps_seen < config.min_steps_per_life:
            # Lives this short mean the transient leaves too little headroom for the leak: shrink as well.
            next_batch, next_accum = shrink(batch, accum, config)
            reason += (f"; life of {estimator.steps_seen} steps too short: "
                       f"batch {batch}x{accum} -> {next_batch}x{next_accum}")
            return Decision(Action.CHECKPOINT_EXIT, Diagnosis.LEAK_PREDICTED, reason, next_batch, next_accum)
        return Decision(Action.CHECKPOINT_EXIT, Diagnosis.LEAK_PREDICTED, reason, batch, accum)
    if batch < config.max_batch and healthy_steps >= config.regrow_after_steps and estimator.levels:
        grown, grown_accum = regrow(batch, accum, config)
        per_sample = estimator.transient / batch
        projected = estimator.level + per_sample * grown
        if grown > batch and projected < config.regrow_headroom * limits.budget:
            reason = f"projected peak {int(projected)} at batch {grown} < {config.regrow_headroom:.0%} of budget"
            return Decision(Action.CHECKPOINT_EXIT, Diagnosis.REGROW, reason, grown, grown_accum)
    return NOTHING


def shrink(batch: int, accum: int, config: PolicyConfig) -> tuple[int, int]:
    """Smaller batch; with keep_effective_batch the largest divisor of batch*accum under the target."""
    target = max(config.min_batch, int(batch * config.shrink_factor))
    if not config.keep_effective_batch:
        return min(target, batch), accum
    effective = batch * accum
    for candidate in range(min(target, batch), 0, -1):
        if effective % candidate == 0:
            return candidate, effective // candidate
    return 1, effective  # pragma: no cover - 1 always divides


def regrow(batch: int, accum: int, config: PolicyConfig) -> tuple[int, int]:
    """Larger batch (x2 up to the configured one) with the effective batch kept."""
    effective = batch * accum
    for candidate in range(min(batch * 2, config.max_batch), batch, -1):
        if effective % candidate == 0:
            return candidate, effective // candidate
    return batch, accum


def hold_threshold(limits: Limits, sampled: int, reported: int) -> int:
    """Footprint, as the worker measures its own, under which it may hold the telemetry of a step: as far
    below the warn band as the warn band is below the budget, less what the rest of its process group holds
    (the last group sample ``sampled`` over the worker's last reported footprint ``reported``)."""
    others = max(0, sampled - reported)
    return max(0, limits.warn - (limits.budget - limits.warn) - others)


def hold_horizon(estimator: Estimator) -> int:
    """Steps of footprint trend a worker looks ahead before holding a step: twice what a predicted breach
    leaves (the steps a checkpoint needs, plus the ones the command lands late)."""
    return 2 * (estimator.config.checkpoint_steps + estimator.late_steps)


def sample_gap(headroom: int, interval: float, longest: float, growth: float) -> float:
    """Seconds to the next footprint sample of a worker ``headroom`` bytes under its budget: the whole number of
    ``interval``s in which growth at ``growth`` bytes/s could not reach the budget, at least one (also with no
    headroom) and at most ``longest`` seconds' worth. Far from the budget the daemon samples less often, and a
    worker growing no faster than ``growth`` still cannot cross its budget between two samples."""
    if headroom <= 0 or growth <= 0 or longest <= interval:
        return interval
    return max(1, int(min(longest, headroom / growth) / interval + 1e-9)) * interval  # 0.25 / 0.05 is 4.999...


def backoff_delay(failures: int, initial: float, maximum: float) -> float:
    """Exponential backoff before restart number ``failures`` (1-based)."""
    return float(min(maximum, initial * 2 ** max(0, failures - 1)))
