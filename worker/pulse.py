"""The session's background thread: keepalives while the trainer is busy, and the orphan watchdog.

The training loop talks to the daemon only at step boundaries, which is right for commands but leaves two
gaps that a thread closes:
- a long model load, compile, evaluation or save sends nothing, so the daemon would take the worker for hung:
  inside ``busy()`` the thread sends a heartbeat every second;
- a worker whose daemon died (re-parented) or went silent notices only at its next step boundary, which may
  be a minute away, and nobody enforces its budget meanwhile: the thread notices within a quarter second (a
  dead daemon) or ``orphan_timeout`` (a silent one), gives the loop half of ``orphan_timeout`` to reach a
  boundary and checkpoint there, and otherwise ends the process. The last durable checkpoint stands.

The ZeroMQ socket is shared with the training thread under one lock (a socket may change threads across a
full memory barrier, which the lock provides); the thread also drains what arrives, so heartbeats from the
daemon are seen mid-step, and hands commands to the loop for its next boundary.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator

INTERVAL = 0.25  # seconds between the thread's looks
KEEPALIVE_EVERY = 1.0  # seconds between heartbeats while busy
WAITING_AFTER = 1.0  # seconds inside a collective before the thread reports it (a normal all-reduce is ms)

Exit = Callable[[int], None]


class Pulse:
    """Keepalives and the orphan watchdog for one supervised session."""

    def __init__(
        self, lock: threading.Lock, send_heartbeat: Callable[[], None], drain: Callable[[], None],
        last_heard: Callable[[], float], orphan_timeout: float, exit_code: int, *, parent: int | None = None,
        exit: Exit = os._exit, clock: Callable[[], float] = time.time, interval: float = INTERVAL,
    ) -> None:
        self._lock = lock
        self._send_heartbeat = send_heartbeat
        self._drain = drain
        self._last_heard = last_heard
        self._orphan_timeout = orphan_timeout
        self._exit_code = exit_code
        self._parent = os.getppid() if parent is None else parent
        self._exit = exit
        self._clock = clock
        self._interval = interval
        self._busy: list[str] = []
        self._inside: tuple[str, float] | None = None  # the collective the loop is in, since when
        self._last_waiting = 0.0
        self.send_waiting: Callable[[str, float], None] | None = None  # set once the daemon asked for it
        self._last_keepalive = 0.0
        self._orphaned_at: float | None = None
        self.leaving = False  # the loop is checkpointing on its way out: give it time
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mlxsup-pulse", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=2 * self._interval + 1)

    @contextlib.contextmanager
    def busy(self, what: str) -> Iterator[None]:
        """Keep the daemon's hang timer from firing while ``what`` runs (model load, compile, eval, save)."""
        self._busy.append(what)
        self.keepalive()
        try:
            yield
        finally:
            self._busy.remove(what)

    @contextlib.contextmanager
    def collective(self, what: str) -> Iterator[None]:
        """The loop is inside collective ``what`` (it may block there without a timeout if a peer is stopped,
        lost or deadlocked): after ``WAITING_AFTER`` seconds the thread says so, once a second, with heartbeats
        that are no sign of life. Two attribute writes when the collective returns in time."""
        self._inside = (what, self._clock())
        try:
            yield
        finally:
            self._inside = None

    def keepalive(self) -> None:
        """Send a heartbeat now (from any thread)."""
        with self._lock:
            self._send_heartbeat()
        self._last_keepalive = self._clock()

    def orphan_reason(self) -> str:
        """'daemon_lost' (re-parented), 'daemon_silent' (no heartbeat for orphan_timeout) or ''."""
        if os.getppid() != self._parent:
            return "daemon_lost"
        if self._clock() - self._last_heard() > self._orphan_timeout:
            return "daemon_silent"
        return ""

    def check(self) -> None:
        """One look: drain the socket, keep alive while busy, and end an orphan that did not leave in time."""
        with self._lock:
            self._drain()
        now = self._clock()
        if self._busy and now - self._last_keepalive >= KEEPALIVE_EVERY:
            self.keepalive()
        else:
            self._report_waiting(now)
        reason = self.orphan_reason()
        if not reason:
            self._orphaned_at = None
            return
        if self._orphaned_at is None:
            self._orphaned_at = now
        grace = self._orphan_timeout / 2 + (self._orphan_timeout if self.leaving else 0.0)
        if now - self._orphaned_at >= grace:
            print(f"[worker] watchdog: {reason}; leaving mid-step, the last durable checkpoint stands",
                  file=sys.stderr, flush=True)
            self._exit(self._exit_code)

    def _report_waiting(self, now: float) -> None:
        inside, send = self._inside, self.send_waiting
        if inside is None or send is None or now - inside[1] < WAITING_AFTER:
            return
        if now - self._last_waiting >= KEEPALIVE_EVERY:
            self._last_waiting = now
            with self._lock:
                send(inside[0], now - inside[1])

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.check()
