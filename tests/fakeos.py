"""A deterministic fake OS for the daemon's job logic: a settable clock and processes that exit when told.

Named as a fake on purpose: tests that use it check decisions and timing exactly; the same logic runs
against real processes in the end-to-end tests.
"""

from __future__ import annotations

import signal
from collections.abc import Mapping, Sequence
from pathlib import Path

from supervisor.daemon.footprint import GroupSample

MiB = 2**20


class FakeProcess:
    """A worker process: ``code`` is its exit status once it has exited. SIGKILL always ends it; SIGTERM ends
    it with ``term_exit`` when that is set (75: the SDK checkpoints and leaves) and is ignored otherwise."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.code: int | None = None
        self.sampled = 100 * MiB
        self.complete = True
        self.term_exit: int | None = None
        self.signals: list[int] = []
        self.reaped = False

    def poll(self) -> int | None:
        if self.code is not None:
            self.reaped = True
        return self.code

    def signal_group(self, signum: int) -> bool:
        if self.reaped:
            return False
        self.signals.append(signum)
        if self.code is None and signum == signal.SIGKILL:
            self.code = -signal.SIGKILL
        elif self.code is None and signum == signal.SIGTERM and self.term_exit is not None:
            self.code = self.term_exit
        return True

    def sample(self, now: float) -> GroupSample:
        if self.code is not None:
            return GroupSample(0, 0, False)
        return GroupSample(self.sampled, 1, self.complete)


class FakeSystem:
    """Spawns FakeProcesses (pids from 4000) and tells a settable time, available memory (half the total unless
    set) and macOS memory pressure level (``level``: None as off macOS, or 1 normal, 2 warn, 4 critical)."""

    def __init__(self, total: int = 16 << 30) -> None:
        self.clock = 1000.0
        self.total = total
        self.available = total // 2
        self.level: int | None = None
        self.procs: list[FakeProcess] = []
        self.spawn_error: OSError | None = None

    def spawn(self, argv: Sequence[str], env: Mapping[str, str], cwd: Path | None, log_dir: Path) -> FakeProcess:
        if self.spawn_error is not None:
            raise self.spawn_error
        self.procs.append(FakeProcess(4000 + len(self.procs)))
        return self.procs[-1]

    def now(self) -> float:
        return self.clock

    def memory(self) -> tuple[int, int]:
        return self.available, self.total

    def pressure(self) -> int | None:
        return self.level
