"""Memory measured from outside: a worker group's footprint and the machine's.

A process's footprint is what ``protocol.footprint`` defines (macOS physical footprint, else RSS). A worker's
footprint is the sum over its whole process group (the worker leads its own group): on macOS the group is listed
with libproc's ``proc_listpgrppids``, elsewhere by scanning ``/proc`` for processes with that group id. So a
grandchild whose parent exited, re-parented to launchd or init, still counts on both platforms. The libSystem
functions come from ``protocol.darwin``; the functions parsing their answers take the C function as a parameter so
tests can hand them a fake. ctypes is imported only on macOS, mlx never.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Final

import psutil

from protocol.darwin import CFunction, darwin
from protocol.footprint import FootprintUnreadable, phys_footprint

_PRESSURE_SYSCTL: Final = b"kern.memorystatus_vm_pressure_level"
_MAX_GROUP: Final = 1 << 16  # pids read from one process group at most (a fork bomb is not a worker)


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
    try:
        footprint = phys_footprint(pid)
    except FootprintUnreadable:
        return None
    if footprint is not None:
        return footprint
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


# --- the members of a process group -----------------------------------------------------------------------


def group_pids(pgid: int) -> list[int]:
    """Pids of every process (zombies included) whose process group is ``pgid``."""
    calls = darwin()
    if calls is not None:
        return _macos_group_pids(pgid, calls.proc_listpgrppids)
    return _scanned_group_pids(pgid)


def _macos_group_pids(pgid: int, proc_listpgrppids: CFunction) -> list[int]:
    """``proc_listpgrppids(pgid, buf, bytes)`` returns how many pids it wrote (0 on error or for no group); a
    full buffer may have been cut short, so it is asked again with a larger one."""
    import ctypes

    capacity = 64
    while True:
        buffer = (ctypes.c_int * capacity)()
        count = proc_listpgrppids(pgid, buffer, ctypes.sizeof(buffer))
        if count < capacity or capacity >= _MAX_GROUP:
            return [pid for pid in buffer[: max(0, min(count, capacity))] if pid > 0]
        capacity *= 4


def _scanned_group_pids(pgid: int) -> list[int]:
    try:
        candidates = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:  # no procfs
        candidates = psutil.pids()
    members = []
    for pid in candidates:
        try:
            if os.getpgid(pid) == pgid:
                members.append(pid)
        except (ProcessLookupError, PermissionError):
            continue
    return members


class GroupSampler:
    """Samples the footprint of a worker's process group."""

    def __init__(self, pid: int, refresh_interval: float = 1.0) -> None:
        """Sample the group led by ``pid`` (its pgid): the leader on every sample, the other members as found by
        a listing that runs at most every ``refresh_interval`` seconds, since listing a group costs milliseconds.
        """
        self.pid = pid
        self.refresh_interval = refresh_interval
        self._next_refresh = -math.inf
        self._members: list[int] = [pid]
        self._macos = darwin() is not None
        self._processes: dict[int, psutil.Process] = {}

    def sample(self, now: float) -> GroupSample:
        """Footprint of the group at ``now`` (a monotonic clock reading, used only to pace the listings).

        A member that cannot be read (ESRCH: gone; EPERM: not ours) makes the sample incomplete and forces a new
        listing on the next call, so a member that exited costs one incomplete sample. Members born since the last
        listing are missed until the next one. A member's pid reused by a stranger within one interval would be
        counted: pids cycle far too slowly for that to matter.
        """
        if now >= self._next_refresh:
            self._refresh()
            self._next_refresh = now + self.refresh_interval
        total, count, complete = 0, 0, True
        for pid in self._members:
            footprint = self._read(pid)
            if footprint is None:
                complete = False
                continue
            total += footprint
            count += 1
        if not complete:
            self._next_refresh = now
        return GroupSample(total, count, complete)

    def _refresh(self) -> None:
        members = [self.pid, *(pid for pid in group_pids(self.pid) if pid != self.pid)]
        self._processes = {pid: proc for pid, proc in self._processes.items() if pid in members}
        self._members = members

    def _read(self, pid: int) -> int | None:
        if self._macos:
            try:
                return phys_footprint(pid)
            except FootprintUnreadable:
                return None
        try:
            proc = self._processes.get(pid) or self._processes.setdefault(pid, psutil.Process(pid))
            return int(proc.memory_info().rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            self._processes.pop(pid, None)
            return None


# --- the machine ------------------------------------------------------------------------------------------


def system_memory() -> tuple[int, int]:
    """(available, total) bytes of the machine. On macOS psutil's available is inactive + free: a rough figure,
    which is why the pressure level is read as well."""
    memory = psutil.virtual_memory()
    return int(memory.available), int(memory.total)


def pressure_level() -> int | None:
    """macOS memory pressure: 1 normal, 2 warn, 4 critical (``kern.memorystatus_vm_pressure_level``);
    None elsewhere or when the sysctl cannot be read."""
    calls = darwin()
    return None if calls is None else _macos_pressure_level(calls.sysctlbyname)


def _macos_pressure_level(sysctlbyname: CFunction) -> int | None:
    """Read the pressure sysctl with ``sysctlbyname(name, &value, &size, NULL, 0)``; None on failure."""
    import ctypes

    value = ctypes.c_int(0)
    size = ctypes.c_size_t(ctypes.sizeof(value))
    if sysctlbyname(_PRESSURE_SYSCTL, ctypes.byref(value), ctypes.byref(size), None, 0) != 0:
        return None
    return value.value
