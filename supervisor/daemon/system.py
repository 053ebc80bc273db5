"""The operating-system effects the daemon has: spawn, signal, reap, sample, clock.

Everything behind one small interface so job logic can run against real processes or a deterministic fake.
"""

from __future__ import annotations

import errno
import functools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from protocol import darwin as _darwin
from supervisor.daemon.footprint import GroupSample, GroupSampler, pressure_level, system_memory
from supervisor.daemon.logs import rotate_files


class WorkerProcess(Protocol):
    """A spawned worker, leader of its own process group."""

    pid: int

    def poll(self) -> int | None:
        """Exit status once the leader has exited (negative: killed by that signal), else None."""

    def signal_group(self, signum: int) -> bool:
        """Send ``signum`` to the whole group; False when nothing was left to signal."""

    def sample(self, now: float) -> GroupSample:
        """Footprint of the worker's process group."""


class System(Protocol):
    """Spawning, clock and machine-wide memory."""

    def spawn(self, argv: Sequence[str], env: Mapping[str, str], cwd: Path | None, log_dir: Path) -> WorkerProcess:
        ...

    def now(self) -> float:
        ...

    def memory(self) -> tuple[int, int]:
        """(available, total) bytes."""

    def pressure(self) -> int | None:
        ...


@dataclass(frozen=True)
class ExitProbe:
    """Tells whether a child has exited, leaving it unreaped (a zombie still holding its pid and process group).

    Raises ChildProcessError when ``pid`` is not (or no longer) a child of ours.
    """

    name: str
    exited: Callable[[int], bool]


@functools.cache
def exit_probe() -> ExitProbe:
    """The platform's way to learn of a child's exit without reaping it, chosen once.

    ``os.waitid`` with WNOWAIT where CPython has it (Linux; macOS from Python 3.13). macOS builds of CPython 3.11
    and 3.12 leave ``os.waitid`` out, so there libSystem's own ``waitid`` is called through ctypes, with xnu's
    constants (CPython gh-113536).
    """
    if hasattr(os, "waitid"):
        return ExitProbe("os.waitid", _os_waitid_exited)
    calls = _darwin.darwin()
    if calls is not None:
        return ExitProbe("libSystem waitid (ctypes)", functools.partial(_libc_waitid_exited, calls.waitid))
    raise RuntimeError(f"no way to wait for a child without reaping it on {sys.platform} (needs waitid)")


def _os_waitid_exited(pid: int) -> bool:
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _libc_waitid_exited(waitid: _darwin.CFunction, pid: int) -> bool:
    """``waitid(P_PID, pid, &info, WEXITED|WNOHANG|WNOWAIT)``: 0 with si_pid set once the child has exited, 0 with
    si_pid untouched (we zero it) while it runs, -1 with errno otherwise."""
    import ctypes

    info = (ctypes.c_char * _darwin.SIGINFO_SIZE)()
    options = _darwin.WEXITED | _darwin.WNOHANG | _darwin.WNOWAIT
    while waitid(_darwin.P_PID, pid, info, options) != 0:
        code = _darwin.errno()
        if code == errno.EINTR:
            continue
        error = ChildProcessError if code == errno.ECHILD else OSError
        raise error(code, f"waitid({pid}): {os.strerror(code)}")
    si_pid = info.raw[_darwin.SI_PID_OFFSET:_darwin.SI_PID_OFFSET + 4]
    return int.from_bytes(si_pid, sys.byteorder, signed=True) != 0


class RealProcess:
    """A subprocess in its own session; signalled by group only while the leader is unreaped.

    An unreaped leader (running or zombie) keeps its pid and process-group id reserved, so a group signal
    can never reach a recycled pid. When the leader has exited, the group gets one last SIGKILL sweep while
    the zombie still holds the ids, and only then is the leader reaped and the process dropped.
    """

    def __init__(self, popen: subprocess.Popen[bytes], refresh: float = 1.0) -> None:
        self._popen = popen
        self.pid = popen.pid
        self._sampler = GroupSampler(popen.pid, refresh_interval=refresh)
        self._returncode: int | None = None

    def poll(self) -> int | None:
        if self._returncode is None and self._leader_exited():
            self._sweep()  # before reaping: the zombie leader still reserves its pid and process group
            self._returncode = self._popen.wait()
        return self._returncode

    def _leader_exited(self) -> bool:
        """Whether the leader has exited, without reaping it (WNOWAIT)."""
        try:
            return exit_probe().exited(self.pid)
        except ChildProcessError:
            return self._popen.poll() is not None

    def _sweep(self) -> None:
        # The leader is gone; stragglers it left in its group must not outlive it.
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def signal_group(self, signum: int) -> bool:
        if self._returncode is not None:
            return False
        try:
            os.killpg(self.pid, signum)
        except ProcessLookupError:
            return False
        return True

    def sample(self, now: float) -> GroupSample:
        return self._sampler.sample(now)


def rotate_if_large(path: Path, max_bytes: int, keep: int) -> None:
    """Worker logs are rotated between lives (never under a running worker): x.log -> x.log.1 -> ..."""
    try:
        if not max_bytes or path.stat().st_size < max_bytes:
            return
    except FileNotFoundError:
        return
    rotate_files(path, keep)


class RealSystem:
    """The real machine."""

    def __init__(self, sampler_refresh: float = 1.0, log_max: int = 50 * 2**20, log_keep: int = 3) -> None:
        self._refresh = sampler_refresh
        self._log_max = log_max
        self._log_keep = log_keep

    def spawn(self, argv: Sequence[str], env: Mapping[str, str], cwd: Path | None, log_dir: Path) -> RealProcess:
        log_dir.mkdir(parents=True, exist_ok=True)
        for name in ("stdout.log", "stderr.log"):
            rotate_if_large(log_dir / name, self._log_max, self._log_keep)
        with open(log_dir / "stdout.log", "ab") as out, open(log_dir / "stderr.log", "ab") as err:
            popen = subprocess.Popen(
                list(argv), env=dict(env), cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                start_new_session=True, close_fds=True,
            )
        return RealProcess(popen, self._refresh)

    def now(self) -> float:
        return time.monotonic()

    def memory(self) -> tuple[int, int]:
        return system_memory()

    def pressure(self) -> int | None:
        return pressure_level()
