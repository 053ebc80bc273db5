"""The macOS system calls the project makes, and the one switch that selects the darwin code paths.

Every ``darwin`` branch of the project calls libSystem through the functions here: ``proc_pid_rusage`` and
``proc_listpgrppids`` (libproc), ``sysctlbyname`` and ``waitid``. They are loaded once, through ctypes, on macOS
only. ``select_darwin(library)`` makes the same branches run anywhere with another library's functions: the
macOS-shaped test lane uses it to drive them with fakes of the C functions on Linux (tests/fake_macos/).

Constants are xnu's (``bsd/sys/wait.h``, ``bsd/sys/resource.h``, ``bsd/sys/signal.h``); they differ from
Linux's (Linux's WNOWAIT is 0x01000000 and its siginfo_t puts si_pid at offset 16), so they live here instead of
being read from ``os``. Standard library only; ctypes is imported only when the darwin paths are used.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

CFunction = Callable[..., int]

# bsd/sys/wait.h
P_PID: Final = 1
WNOHANG: Final = 0x01
WEXITED: Final = 0x04
WNOWAIT: Final = 0x20
# bsd/sys/signal.h: struct __siginfo is int si_signo, si_errno, si_code; pid_t si_pid; ... 104 bytes on LP64.
SIGINFO_SIZE: Final = 104
SI_PID_OFFSET: Final = 12
# bsd/sys/resource.h
RUSAGE_INFO_V2: Final = 2
# <unistd.h>: confstr's per-user temporary directory (/var/folders/…/T/). CPython's os.confstr_names has no
# entry for it (Modules/posixmodule.c), but os.confstr takes the number. Checked against Apple's header:
# "#define _CS_DARWIN_USER_TEMP_DIR 65537" (beside _CS_DARWIN_USER_DIR 65536 and _CS_DARWIN_USER_CACHE_DIR 65538,
# under __DARWIN_C_LEVEL >= __DARWIN_C_FULL) in the macOS 13 SDK's usr/include/unistd.h, as vendored by Zig
# (github.com/ziglang/zig, lib/libc/include/any-macos.13-any/unistd.h, commit f2892775990a). The 10.4u SDK's
# unistd.h (github.com/phracker/MacOSX-SDKs) has no _CS_DARWIN_* names: the number is newer than 10.4.
# tests/test_darwin_real.py asks the real confstr on a Mac and compares with $TMPDIR.
CS_DARWIN_USER_TEMP_DIR: Final = 65537
# The dylibs live in the dyld shared cache on recent macOS: dlopen finds them though no file exists.
LIBSYSTEM: Final = "/usr/lib/libSystem.B.dylib"


@dataclass(frozen=True)
class Darwin:
    """libSystem's functions, with their C signatures set."""

    proc_pid_rusage: CFunction  # int (int pid, int flavor, rusage_info_t *buffer)
    proc_listpgrppids: CFunction  # int (pid_t pgrpid, void *buffer, int buffersize): pids written, 0 on error
    sysctlbyname: CFunction  # int (const char *, void *, size_t *, void *, size_t)
    waitid: CFunction  # int (idtype_t, id_t, siginfo_t *, int)

    @classmethod
    def from_library(cls, library: Any) -> Darwin:
        """Take the four functions from a ctypes library (or a fake with the same attributes) and type them."""
        import ctypes

        signatures: dict[str, list[Any]] = {
            "proc_pid_rusage": [ctypes.c_int, ctypes.c_int, ctypes.c_void_p],
            "proc_listpgrppids": [ctypes.c_int, ctypes.c_void_p, ctypes.c_int],
            "sysctlbyname": [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t],
            "waitid": [ctypes.c_int, ctypes.c_uint, ctypes.c_void_p, ctypes.c_int],
        }
        functions = {}
        for name, argtypes in signatures.items():
            function = getattr(library, name)
            function.argtypes = argtypes
            function.restype = ctypes.c_int
            functions[name] = function
        return cls(**functions)


_selected: Darwin | None = None


def select_darwin(library: Any) -> None:
    """Run the darwin code paths from now on, calling ``library``'s functions (for running them off macOS).

    Call it before anything else asks ``darwin()`` (at interpreter start): the choice is made once.
    """
    global _selected
    _selected = Darwin.from_library(library)
    darwin.cache_clear()


@functools.cache
def darwin() -> Darwin | None:
    """libSystem's functions on macOS (or the selected ones); None elsewhere. Chosen once."""
    if _selected is not None:
        return _selected
    if sys.platform != "darwin":
        return None
    import ctypes

    try:
        return Darwin.from_library(ctypes.CDLL(LIBSYSTEM, use_errno=True))
    except (OSError, AttributeError):  # pragma: no cover - every macOS since 10.9 has all four
        return None


def is_macos() -> bool:
    """Whether this process runs (or is made to look like it runs) on macOS: paths, service manager, calls."""
    return sys.platform == "darwin" or darwin() is not None


def errno() -> int:
    """The errno the last libSystem call left (ctypes' copy, kept because the library is loaded with use_errno)."""
    import ctypes

    return ctypes.get_errno()
