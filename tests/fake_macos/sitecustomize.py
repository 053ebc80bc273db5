"""The macOS-shaped test lane: make every Python process started with MLXSUP_FAKE_MACOS=1 look like macOS CPython 3.11.

On PYTHONPATH (``make test-fake-macos`` puts this folder there), Python imports this module at start-up in every
process: pytest, the daemons it starts and their workers. With MLXSUP_FAKE_MACOS=1 it

- removes what macOS builds of CPython 3.11/3.12 lack: ``os.waitid`` and ``os.waitid_result`` (CPython gh-113536:
  posixmodule.c builds the function only ``if defined(HAVE_WAITID) && !defined(__APPLE__)``), and what exists on
  Linux only: ``os.P_PIDFD``, ``os.pidfd_open``, ``select.epoll``. ``os.P_PID``, ``P_PGID``, ``P_ALL`` and
  ``os.WNOWAIT`` stay, as on macOS (their guard has no ``__APPLE__``), with Linux's values: the darwin paths must
  not read them (they take xnu's from protocol.darwin), and the fake waitid refuses Linux's WNOWAIT;
- adds ``fcntl.F_FULLFSYNC`` (51, as in macOS's <sys/fcntl.h>), which the fake ``fcntl.fcntl`` carries out as
  the fsync it is on top of (set MLXSUP_FAKE_FULLFSYNC=fail to make it fail with ENOTSUP, as on some file systems);
- selects the darwin code paths with fakes of libSystem's functions (fake_libsystem.py).

Without MLXSUP_FAKE_MACOS=1 it does nothing; on a real Mac neither (the lane is for Linux: its fakes read /proc,
and the real calls are there, so the lane's tests run on them and tests/test_darwin_real.py checks them).
"""

from __future__ import annotations

import os
import sys

if os.environ.get("MLXSUP_FAKE_MACOS") == "1" and sys.platform != "darwin":
    import errno
    import fcntl
    import select

    import fake_libsystem

    from protocol.darwin import select_darwin

    for _name in ("waitid", "waitid_result", "P_PIDFD", "pidfd_open"):
        if hasattr(os, _name):
            delattr(os, _name)
    if hasattr(select, "epoll"):
        del select.epoll

    _F_FULLFSYNC = 51
    _real_fcntl = fcntl.fcntl

    def _fcntl(fd: int, cmd: int, arg: int = 0) -> int:  # type: ignore[no-untyped-def]
        if cmd != _F_FULLFSYNC:
            return _real_fcntl(fd, cmd, arg)
        fake_libsystem._record("F_FULLFSYNC")
        if os.environ.get("MLXSUP_FAKE_FULLFSYNC") == "fail":
            raise OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP))
        os.fsync(fd)
        return 0

    fcntl.F_FULLFSYNC = _F_FULLFSYNC  # type: ignore[attr-defined]
    fcntl.fcntl = _fcntl  # type: ignore[assignment]
    select_darwin(fake_libsystem.FakeLibSystem())
