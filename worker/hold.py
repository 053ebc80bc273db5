"""Holding step telemetry while memory is far from the daemon's bands, so many steps cost the daemon one wakeup.

Every Step frame wakes the daemon, and a wakeup on a machine busy with training costs it far more than the
frame itself (cold caches). Far from the warn band nothing urgent rides on a step's telemetry: the daemon's
own footprint samples guard the budget, and the leak prediction only needs steps near the band. So while the
daemon allows it (its heartbeats carry ``hold``, ``hold_below`` and ``hold_horizon``, see
``protocol.messages.Heartbeat``), a calm step's frame is held, and the held frames go out together when one
of them has waited ``hold`` seconds. A step that is not calm (its footprint plus transient, or the footprint's
trend ``hold_horizon`` steps ahead, reaches ``hold_below``) goes out at once with the held ones before it:
the edge trigger. So do any frame other than a step (held steps go first, order is kept), and every step of a
worker that has not been told to hold. A command from the daemon stops holding until its next heartbeat.

When the heartbeat also carries ``hold_rows``, a run of steps goes out as ``steps`` frames of at most that many
rows (``batch_frames``), which the daemon handles at about the cost of one step: its cost stops growing with
the step rate. Without it, each step is its own frame, as version 1 daemons expect.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from typing import Any

from protocol.messages import MAX_STEPS_ROWS, Step, Steps, encode

MAX_HELD = 1000  # steps held at most (about 100 kB as frames): a very fast loop sends a burst before the timer


def batch_frames(messages: Sequence[Any], rows: int, version: int = 1) -> list[bytes]:
    """The frames for ``messages`` in order, written in protocol ``version``: each run of ``Step`` messages as
    ``steps`` frames of at most ``rows`` rows when ``rows`` > 1 (a run of one stays a ``step`` frame), every other
    message as its frame."""
    if rows < 2 or len(messages) < 2:  # the common case on the per-step path: nothing to batch
        return [encode(message, version) for message in messages]
    frames: list[bytes] = []
    for is_step, group in itertools.groupby(messages, lambda message: isinstance(message, Step)):
        run = list(group)
        if not is_step:
            frames += [encode(message, version) for message in run]
            continue
        for start in range(0, len(run), rows):
            chunk = run[start:start + rows]
            frames.append(encode(chunk[0] if len(chunk) == 1 else Steps.of(chunk), version))
    return frames


class StepHold:
    """Which messages to send now; pure bookkeeping (no socket), the clock is injectable. It holds whatever
    the caller gives it (``Step`` messages in the SDK) and hands them back in order."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_held: int = MAX_HELD) -> None:
        self.clock = clock
        self.max_held = max_held
        self.hold = 0.0  # seconds a calm step may wait; 0: send every step at once
        self.below = 0
        self.horizon = 0
        self.rows = 0  # rows a steps frame may carry (0: one frame per step)
        self.held: list[Any] = []
        self.held_since = 0.0
        self._last: tuple[int, int] | None = None  # (step, footprint) of the previous step
        self._sent_a_step = False
        self._flush = False  # a heartbeat narrowed the permission: the held steps are due at once

    def configure(self, hold: float | None, below: int | None, horizon: int | None, rows: int | None = None) -> None:
        """What the daemon's latest heartbeat allows (any field absent: hold nothing)."""
        self.rows = min(rows or 0, MAX_STEPS_ROWS)
        if hold is None or below is None or horizon is None:
            self.hold = 0.0
        else:
            # A smaller hold_below than the held steps were calm under sends them at once (PROTOCOL.md 3).
            self._flush = self._flush or (bool(self.held) and self.hold > 0 and below < self.below)
            self.hold, self.below, self.horizon = max(0.0, hold), below, horizon

    def stop_holding(self) -> None:
        """The daemon is acting (it sent a command): every step at once until it says otherwise."""
        self.hold = 0.0

    def calm(self, step: int, footprint: int, transient: int) -> bool:
        """Whether this step is far enough from the band to wait; updates the trend."""
        last, self._last = self._last, (step, footprint)
        if self.hold <= 0 or not self._sent_a_step:
            return False  # not allowed, or the first step of this process (restarts are timed by it)
        trend = 0.0
        if last is not None and step > last[0]:
            trend = max(0.0, (footprint - last[1]) / (step - last[0]))
        return footprint + transient < self.below and footprint + trend * self.horizon < self.below

    def step(self, frame: Any, step: int, footprint: int, transient: int) -> list[Any]:
        """A step (its message or frame): [] when it is held, else everything to send now, in order."""
        if self.calm(step, footprint, transient) and len(self.held) < self.max_held and not self.due():
            if not self.held:
                self.held_since = self.clock()
            self.held.append(frame)
            return []
        self._sent_a_step = True
        return self.release(frame)

    def release(self, frame: Any = None) -> list[Any]:
        """The held steps (and ``frame`` after them), to send now."""
        frames, self.held, self._flush = self.held, [], False
        if frame is not None:
            frames.append(frame)
        return frames

    def due(self) -> bool:
        """Whether the oldest held frame has waited ``hold`` seconds (or holding was stopped or narrowed)."""
        return bool(self.held) and (self.hold <= 0 or self._flush or self.clock() - self.held_since >= self.hold)
