"""What the protocol calls a process's footprint, and how to read it cheaply.

On macOS it is the physical footprint (what Activity Monitor shows and what jetsam acts on; it includes
compressed and Metal-wired memory that RSS misses), read with ``proc_pid_rusage`` from libproc. Elsewhere it
is RSS. Workers report their own footprint with every step (``self_footprint``); the daemon reads other
processes' with ``phys_footprint``. The libSystem functions come from ``protocol.darwin``, and the parsing takes
the C function as a parameter so tests can hand it a fake; ctypes is imported only on macOS. Standard library only
(psutil is imported lazily on platforms with neither procfs nor libproc).
"""

from __future__ import annotations

import errno
import functools
import os
import sys
import threading
from typing import TYPE_CHECKING, Any, Final

from protocol import darwin as _darwin
from protocol.darwin import RUSAGE_INFO_V2, CFunction

if TYPE_CHECKING:
    import ctypes

# struct rusage_info_v2 from <sys/resource.h>: uint8_t ri_uuid[16], then these uint64_t fields in order.
_RUSAGE_INFO_V2_FIELDS: Final = (
    "ri_user_time", "ri_system_time", "ri_pkg_idle_wkups", "ri_interrupt_wkups", "ri_pageins",
    "ri_wired_size", "ri_resident_size", "ri_phys_footprint", "ri_proc_start_abstime",
    "ri_proc_exit_abstime", "ri_child_user_time", "ri_child_system_time", "ri_child_pkg_idle_wkups",
    "ri_child_interrupt_wkups", "ri_child_pageins", "ri_child_elapsed_abstime", "ri_diskio_bytesread",
    "ri_diskio_byteswritten",
)  # fmt: skip

__all__ = ["RUSAGE_INFO_V2", "CFunction", "FootprintUnreadable", "phys_footprint", "self_footprint"]


class FootprintUnreadable(OSError):
    """libproc refused: ESRCH (the process is gone) or EPERM (another user's process, and we are not root)."""


def phys_footprint(pid: int) -> int | None:
    """macOS physical footprint of ``pid``; None off macOS (callers use RSS there).

    Raises FootprintUnreadable when libproc cannot read the process (gone, or not ours): on macOS that is the
    answer, never a reason to mix in another measure. A zombie reads 0.
    """
    calls = _darwin.darwin()
    return None if calls is None else _macos_phys_footprint(pid, calls.proc_pid_rusage)


def _macos_phys_footprint(pid: int, proc_pid_rusage: CFunction) -> int:
    """``ri_phys_footprint`` from ``proc_pid_rusage(pid, RUSAGE_INFO_V2, &info)``; FootprintUnreadable on failure."""
    import ctypes

    info = _rusage_info_v2_type()()
    if proc_pid_rusage(pid, RUSAGE_INFO_V2, ctypes.byref(info)) != 0:
        code = _darwin.errno() or errno.ESRCH
        raise FootprintUnreadable(code, f"proc_pid_rusage({pid}): {os.strerror(code)}")
    return int(info.ri_phys_footprint)


@functools.cache
def _rusage_info_v2_type() -> type[ctypes.Structure]:
    """The ctypes mirror of ``struct rusage_info_v2`` (160 bytes; ri_phys_footprint at offset 72)."""
    import ctypes

    class RusageInfoV2(ctypes.Structure):
        _fields_ = [("ri_uuid", ctypes.c_uint8 * 16), *((f, ctypes.c_uint64) for f in _RUSAGE_INFO_V2_FIELDS)]

    return RusageInfoV2


# --- this process, per training step -----------------------------------------------------------------------


class _SelfReader:
    """Reads our own footprint as cheaply as the platform allows, reopening what it caches after a fork."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._statm_fd = -1
        self._page_size = 0
        self._proc: Any = None
        self._use_statm = sys.platform.startswith("linux") and not _darwin.is_macos()

    def read(self) -> int:
        if self._use_statm:
            fd = self._statm_fd if self._statm_fd >= 0 else self._open_statm()
            if fd >= 0:
                # statm is "size resident shared ...", in pages; pread leaves no offset to rewind.
                return int(os.pread(fd, 128, 0).split(None, 2)[1]) * self._page_size
        try:
            footprint = phys_footprint(os.getpid())
        except FootprintUnreadable:
            footprint = None  # cannot happen for ourselves; RSS is the honest fallback
        return footprint if footprint is not None else self._psutil_rss()

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
            import psutil  # only where neither procfs nor libproc exists

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
