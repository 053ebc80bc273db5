"""Fakes of the four libSystem functions mlx-supervisor calls on macOS, for running the darwin code paths on Linux.

Each fake is a C function pointer (ctypes CFUNCTYPE, errno kept like a library loaded with use_errno) that answers
the way xnu/libproc documents, with real numbers for real processes, read from Linux's /proc:

- ``proc_pid_rusage(pid, RUSAGE_INFO_V2, &info)``: fills a ``rusage_info_v2`` (ri_resident_size at offset 64,
  ri_phys_footprint at 72) with the process's resident bytes; -1/ESRCH for a pid that does not exist; -1/EPERM
  for another user's process unless we are root (``as_uid`` says who "we" are); a zombie reads 0.
- ``proc_listpgrppids(pgid, buf, bytes)``: libproc's answer is the number of pids written (xnu
  ``proc_listpids`` returns bytes, libproc divides by sizeof(int)); zombies included, as xnu walks ``zombproc``
  too; 0 with errno on error; with a NULL buffer, the number of processes plus 20.
- ``sysctlbyname("kern.memorystatus_vm_pressure_level", &int, &size, NULL, 0)``: 1 normal, 2 warn, 4 critical
  (forced with MLXSUP_FAKE_PRESSURE, else from MemAvailable: under 10% critical, under 25% warn); -1/ENOENT for
  any other name; -1/EPERM on a write; -1/ENOMEM when the buffer is too small.
- ``waitid(idtype, id, &siginfo, options)`` with xnu's constants (P_PID 1, WNOHANG 1, WEXITED 4, WNOWAIT 0x20):
  translated to the real Linux waitid, and the answer written in macOS's ``siginfo_t`` layout (si_pid at offset
  12); 0 with siginfo untouched when WNOHANG finds nothing, -1/ECHILD for a pid that is not our child.

MLXSUP_FAKE_MACOS_LOG names a file where each process appends "pid function" the first time it calls a fake,
so a test can tell which processes took the darwin paths.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Captured before the lane removes them from os; absent on a real Mac with Python < 3.13 (then the waitid fake
# fails with ENOSYS: the lane is for Linux).
_REAL_WAITID, _REAL_P_PID = getattr(os, "waitid", None), getattr(os, "P_PID", None)  # both absent on macOS before 3.13
_LINUX_OPTIONS = {0x01: os.WNOHANG, 0x04: os.WEXITED, 0x08: os.WSTOPPED, 0x10: os.WCONTINUED, 0x20: os.WNOWAIT}
_PAGE = os.sysconf("SC_PAGE_SIZE")
_RUSAGE_V2_SIZE, _RESIDENT_AT, _FOOTPRINT_AT = 160, 64, 72
_PRESSURE = b"kern.memorystatus_vm_pressure_level"
_used: set[str] = set()


def _fail(code: int, result: int = -1) -> int:
    ctypes.set_errno(code)
    return result


def _record(name: str) -> None:
    log = os.environ.get("MLXSUP_FAKE_MACOS_LOG")
    if log and name not in _used:
        _used.add(name)
        with open(log, "a") as fh:
            fh.write(f"{os.getpid()} {name}\n")


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name: [state, ppid, pgrp, ...]; None when pid is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text.rpartition(")")[2].split()


class FakeLibSystem:
    """An object with libSystem's function names, each a C function pointer to a fake (see the module doc)."""

    def __init__(self, as_uid: int | None = None) -> None:
        self.as_uid = os.geteuid() if as_uid is None else as_uid
        c = ctypes
        self.proc_pid_rusage = c.CFUNCTYPE(c.c_int, c.c_int, c.c_int, c.c_void_p, use_errno=True)(self._rusage)
        self.proc_listpgrppids = c.CFUNCTYPE(c.c_int, c.c_int, c.c_void_p, c.c_int, use_errno=True)(self._pgrp)
        self.sysctlbyname = c.CFUNCTYPE(c.c_int, c.c_char_p, c.c_void_p, c.c_void_p, c.c_void_p, c.c_size_t,
                                        use_errno=True)(self._sysctl)
        self.waitid = c.CFUNCTYPE(c.c_int, c.c_int, c.c_uint, c.c_void_p, c.c_int, use_errno=True)(self._waitid)

    def _rusage(self, pid: int, flavor: int, buffer: int | None) -> int:
        _record("proc_pid_rusage")
        if not 0 <= flavor <= 6 or not buffer:
            return _fail(errno.EINVAL)
        fields = _stat_fields(pid)
        if fields is None:
            return _fail(errno.ESRCH)
        try:
            owner = os.stat(f"/proc/{pid}").st_uid
            resident = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
        except (FileNotFoundError, ProcessLookupError):
            return _fail(errno.ESRCH)
        if self.as_uid != 0 and owner != self.as_uid:
            return _fail(errno.EPERM)
        if fields[0] == "Z":
            resident = 0  # a zombie has given its memory back
        ctypes.memset(buffer, 0, _RUSAGE_V2_SIZE)
        ctypes.c_uint64.from_address(buffer + _RESIDENT_AT).value = resident
        ctypes.c_uint64.from_address(buffer + _FOOTPRINT_AT).value = resident
        return 0

    def _pgrp(self, pgid: int, buffer: int | None, size: int) -> int:
        _record("proc_listpgrppids")
        pids = sorted(int(name) for name in os.listdir("/proc") if name.isdigit())
        if not buffer:
            return len(pids) + 20
        if size < ctypes.sizeof(ctypes.c_int):
            return _fail(errno.ENOMEM, 0)
        members = [pid for pid in pids if (fields := _stat_fields(pid)) is not None and int(fields[2]) == pgid]
        members = members[: size // ctypes.sizeof(ctypes.c_int)]
        (ctypes.c_int * len(members)).from_address(buffer)[:] = members
        return len(members)

    def _sysctl(self, name: bytes | None, old: int | None, old_size: int | None, new: int | None,
                new_size: int) -> int:
        _record("sysctlbyname")
        if name != _PRESSURE:
            return _fail(errno.ENOENT)
        if new:
            return _fail(errno.EPERM)
        if not old or not old_size:
            return _fail(errno.EINVAL)
        size = ctypes.c_size_t.from_address(old_size)
        if size.value < ctypes.sizeof(ctypes.c_int):
            return _fail(errno.ENOMEM)
        ctypes.c_int.from_address(old).value = pressure_level()
        size.value = ctypes.sizeof(ctypes.c_int)
        return 0

    def _waitid(self, idtype: int, ident: int, info: int | None, options: int) -> int:
        _record("waitid")
        if idtype != 1 or options & ~sum(_LINUX_OPTIONS) or not options & 0x1C or not info:
            return _fail(errno.EINVAL)
        linux = 0
        for bit, value in _LINUX_OPTIONS.items():
            if options & bit:
                linux |= value
        if _REAL_WAITID is None:
            return _fail(errno.ENOSYS)
        try:
            result = _REAL_WAITID(_REAL_P_PID, ident, linux)
        except ChildProcessError:
            return _fail(errno.ECHILD)
        if result is None:
            return 0  # WNOHANG and nothing to report: xnu leaves siginfo as it was
        ctypes.memset(info, 0, 104)
        for offset, value in ((0, signal.SIGCHLD), (8, result.si_code), (12, result.si_pid), (16, result.si_uid),
                              (20, result.si_status)):
            ctypes.c_int.from_address(info + offset).value = value
        return 0


def pressure_level() -> int:
    """The level the fake sysctl reports: MLXSUP_FAKE_PRESSURE, else derived from MemAvailable/MemTotal."""
    forced = os.environ.get("MLXSUP_FAKE_PRESSURE")
    if forced:
        return int(forced)
    info: dict[str, Any] = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        info[key] = int(rest.split()[0])
    fraction = info["MemAvailable"] / info["MemTotal"]
    return 1 if fraction >= 0.25 else 2 if fraction >= 0.10 else 4


@contextlib.contextmanager
def darwin_selected(as_uid: int | None = None, library: FakeLibSystem | None = None) -> Iterator[FakeLibSystem]:
    """Within the block this process takes the darwin code paths with ``library`` (default FakeLibSystem(as_uid));
    afterwards whatever was selected before (nothing, off the lane) again."""
    from protocol import darwin

    before = darwin._selected
    library = FakeLibSystem(as_uid) if library is None else library
    darwin.select_darwin(library)
    try:
        yield library
    finally:
        darwin._selected = before
        darwin.darwin.cache_clear()
