"""Memory measured from outside: a worker group's footprint and the machine's.

A process's footprint is what ``protocol.footprint`` defines (macOS physical footprint, else RSS). Platform
code sits behind a few tiny functions; the macOS ones take the C function as a parameter so tests can hand
them a fake. ctypes is imported only on macOS, mlx never.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import psutil

from protocol.footprint import IS_MACOS, CFunction, phys_footprint

if TYPE_CHECKING:
    pass

_PRESSURE_SYSCTL: Final = b"kern.memorystatus_vm_pressure_level"


@dataclass(frozen=True, slots=True)
class GroupSample:
    """One measurement of a worker group."""

    bytes: int  # sum of footprints of the processes measured
    pids: int  # how many processes were measured
    # False if a process of the set could not be read (vanished, denied): never triggers action alone.
    complete: bool


# --- one process ------------------------------------------------------------------------------------------


def process_footprint(pid: int) -> int | None:
    """Footprint of ``pid`` in bytes (macOS: physical footprint, else RSS); None if gone or unreadable."""
    footprint = phys_footprint(pid)
    if footprint is not None:
        return footprint
    try:
        return _rss(psutil.Process(pid))
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _rss(proc: psutil.Process) -> int | None:
    try:
        return int(proc.memory_info().rss)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


# --- a worker and its descendants -------------------------------------------------------------------------


class GroupSampler:
    """Samples the footprint of a worker and its descendants."""

    def __init__(self, pid: int, refresh_interval: float = 1.0) -> None:
        """Sample ``pid`` (the leader, read on every sample) and the descendants found by a scan that runs at
        most every ``refresh_interval`` seconds, since walking the process table costs milliseconds.
        """
        self.pid = pid
        self.refresh_interval = refresh_interval
        self._next_refresh = -math.inf
        self._descendants: list[psutil.Process] = []
        try:
            self._leader: psutil.Process | None = psutil.Process(pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            self._leader = None

    def sample(self, now: float) -> GroupSample:
        """Footprint of the group at ``now`` (a monotonic clock reading, used only to pace the scans).

        A process that cannot be read makes the sample incomplete and forces a rescan on the next call, so a
        descendant that exited costs one incomplete sample. Descendants born since the last scan are missed
        until the next one. A descendant's pid reused by a stranger within one interval would be counted:
        pids cycle far too slowly for that to matter.
        """
        if now >= self._next_refresh:
            self._refresh()
            self._next_refresh = now + self.refresh_interval
        total, count, complete = 0, 0, self._leader is not None
        for proc in self._members():
            footprint = _footprint_of(proc)
            if footprint is None:
                complete = False
                continue
            total += footprint
            count += 1
        if not complete:
            self._next_refresh = now
        return GroupSample(total, count, complete)

    def _members(self) -> list[psutil.Process]:
        return self._descendants if self._leader is None else [self._leader, *self._descendants]

    def _refresh(self) -> None:
        if self._leader is None:
            self._descendants = []
            return
        try:
            self._descendants = self._leader.children(recursive=True)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            self._descendants = []  # the leader is gone; its own read reports that


def _footprint_of(proc: psutil.Process) -> int | None:
    footprint = phys_footprint(proc.pid)
    return footprint if footprint is not None else _rss(proc)


# --- the machine ------------------------------------------------------------------------------------------


def system_memory() -> tuple[int, int]:
    """(available, total) bytes of the machine."""
    memory = psutil.virtual_memory()
    return int(memory.available), int(memory.total)


def pressure_level() -> int | None:
    """macOS memory pressure: 1 normal, 2 warn, 4 critical (``kern.memorystatus_vm_pressure_level``);
    None elsewhere or when the sysctl cannot be read."""
    sysctlbyname = _libc_sysctlbyname()
    return None if sysctlbyname is None else _macos_pressure_level(sysctlbyname)


def _macos_pressure_level(sysctlbyname: CFunction) -> int | None:
    """Read the pressure sysctl with ``sysctlbyname(name, &value, &size, NULL, 0)``; None on failure."""
    import ctypes

    value = ctypes.c_int(0)
    size = ctypes.c_size_t(ctypes.sizeof(value))
    if sysctlbyname(_PRESSURE_SYSCTL, ctypes.byref(value), ctypes.byref(size), None, 0) != 0:
        return None
    return value.value


@functools.cache
def _libc_sysctlbyname() -> CFunction | None:
    if not IS_MACOS:
        return None
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "/usr/lib/libSystem.B.dylib", use_errno=True)
        function = libc.sysctlbyname
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    function.restype = ctypes.c_int
    return function
