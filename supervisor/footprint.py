"""Memory of processes measured from outside: a worker group's footprint, our own, and the machine's.

On macOS the number that matters is the physical footprint (what Activity Monitor shows and what jetsam
acts on; it includes compressed and Metal-wired memory that RSS misses), read with ``proc_pid_rusage``
from libproc. Elsewhere it is RSS. Platform code sits behind a few tiny functions; the macOS ones take the C
function as a parameter so tests can hand them a fake. ctypes is imported only on macOS, mlx never.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import psutil

if TYPE_CHECKING:
    import ctypes

RUSAGE_INFO_V2: Final = 2
# struct rusage_info_v2 from <sys/resource.h>: uint8_t ri_uuid[16], then these uint64_t fields in order.
_RUSAGE_INFO_V2_FIELDS: Final = (
    "ri_user_time", "ri_system_time", "ri_pkg_idle_wkups", "ri_interrupt_wkups", "ri_pageins",
    "ri_wired_size", "ri_resident_size", "ri_phys_footprint", "ri_proc_start_abstime",
    "ri_proc_exit_abstime", "ri_child_user_time", "ri_child_system_time", "ri_child_pkg_idle_wkups",
    "ri_child_interrupt_wkups", "ri_child_pageins", "ri_child_elapsed_abstime", "ri_diskio_bytesread",
    "ri_diskio_byteswritten",
)  # fmt: skip
_PRESSURE_SYSCTL: Final = b"kern.memorystatus_vm_pressure_level"
_IS_MACOS: Final = sys.platform == "darwin"

CFunction = Callable[..., int]


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
    footprint = _phys_footprint(pid)
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


def _phys_footprint(pid: int) -> int | None:
    """macOS physical footprint of ``pid``; None off macOS or when libproc cannot tell (callers use RSS)."""
    rusage = _libproc_rusage()
    return None if rusage is None else _macos_phys_footprint(pid, rusage)


def _macos_phys_footprint(pid: int, proc_pid_rusage: CFunction) -> int | None:
    """``ri_phys_footprint`` from ``proc_pid_rusage(pid, RUSAGE_INFO_V2, &info)``; None on failure."""
    import ctypes

    info = _rusage_info_v2_type()()
    if proc_pid_rusage(pid, RUSAGE_INFO_V2, ctypes.byref(info)) != 0:
        return None
    return int(info.ri_phys_footprint)


@functools.cache
def _rusage_info_v2_type() -> type[ctypes.Structure]:
    """The ctypes mirror of ``struct rusage_info_v2`` (160 bytes; ri_phys_footprint at offset 72)."""
    import ctypes

    class RusageInfoV2(ctypes.Structure):
        _fields_ = [("ri_uuid", ctypes.c_uint8 * 16), *((f, ctypes.c_uint64) for f in _RUSAGE_INFO_V2_FIELDS)]

    return RusageInfoV2


@functools.cache
def _libproc_rusage() -> CFunction | None:
    """libproc's ``proc_pid_rusage``, or None off macOS or when no library provides it."""
    if not _IS_MACOS:
        return None
    import ctypes
    import ctypes.util

    # The dylibs live in the dyld shared cache on recent macOS: dlopen finds them though no file exists.
    for path in ("/usr/lib/libproc.dylib", ctypes.util.find_library("proc"), "/usr/lib/libSystem.B.dylib"):
        if not path:
            continue
        try:
            function = ctypes.CDLL(path, use_errno=True).proc_pid_rusage
        except (OSError, AttributeError):
            continue
        function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
        function.restype = ctypes.c_int
        return function
    return None


# --- this process, per training step ----------------------------------------------------------------------


class _SelfReader:
    """Reads our own footprint as cheaply as the platform allows, reopening what it caches after a fork."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._statm_fd = -1
        self._page_size = 0
        self._proc: psutil.Process | None = None
        self._use_statm = sys.platform.startswith("linux")

    def read(self) -> int:
        if self._use_statm:
            fd = self._statm_fd if self._statm_fd >= 0 else self._open_statm()
            if fd >= 0:
                # statm is "size resident shared ...", in pages; pread leaves no offset to rewind.
                return int(os.pread(fd, 128, 0).split(None, 2)[1]) * self._page_size
        footprint = _phys_footprint(os.getpid())
        if footprint is not None:
            return footprint
        return self._psutil_rss()

    def _open_statm(self) -> int:
        with self._lock:
            if self._statm_fd < 0:
                try:
                    self._page_size = os.sysconf("SC_PAGE_SIZE")
                    self._statm_fd = os.open("/proc/self/statm", os.O_RDONLY)
                except OSError:
                    self._use_statm = False  # no procfs (a sandbox): psutil from now on
            return self._statm_fd

    def _psutil_rss(self) -> int:
        if self._proc is None:
            self._proc = psutil.Process(os.getpid())
        return int(self._proc.memory_info().rss)

    def after_fork_in_child(self) -> None:
        # The cached fd names the parent's /proc/<pid>/statm: reading it in the child would report the parent.
        if self._statm_fd >= 0:
            os.close(self._statm_fd)
        self._statm_fd = -1
        self._proc = None
        self._lock = threading.Lock()


_self_reader: Final = _SelfReader()
os.register_at_fork(after_in_child=_self_reader.after_fork_in_child)


def self_footprint() -> int:
    """This process's footprint in bytes, fast enough to call every training step (1-2 µs on Linux).

    Linux: resident pages from a cached ``/proc/self/statm`` fd; macOS: ``proc_pid_rusage``; else psutil.
    """
    return _self_reader.read()


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
    footprint = _phys_footprint(proc.pid)
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
    if not _IS_MACOS:
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
