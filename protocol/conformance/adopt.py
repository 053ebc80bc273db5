"""A worker whose parent dies: started through an intermediate parent that the kit kills (the parent_died check).

On Linux the kit makes itself a subreaper, so the orphaned worker becomes its child and its exit status can be
read; elsewhere it only sees the worker vanish (``EXIT_UNKNOWN``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import sys

import psutil

EXIT_UNKNOWN = 256  # the exit status of an adopted worker that another process reaped (no subreaper here)
# A parent between the kit and the worker, which the kit kills to orphan the worker (the parent_died check):
# it starts the worker in a session of its own, as the daemon does, writes its pid to argv[1], and waits (bounded).
PARENT = ("import subprocess, sys, time\n"
          "p = subprocess.Popen(sys.argv[2:], start_new_session=True, close_fds=True)\n"
          "open(sys.argv[1] + '.tmp', 'w').write(str(p.pid))\n"
          "import os; os.replace(sys.argv[1] + '.tmp', sys.argv[1])\n"
          "time.sleep(600)\n")


class Adopted:
    """A worker started by an intermediate parent: the kit reaps it once that parent died and the worker was
    re-parented to the kit (a subreaper on Linux); elsewhere it only sees it vanish (status EXIT_UNKNOWN)."""

    def __init__(self, pid: int, parent: subprocess.Popen[bytes]) -> None:
        self.pid = pid
        self.parent = parent
        self.code: int | None = None

    def poll(self) -> int | None:
        if self.code is not None:
            return self.code
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:  # not (yet) the kit's child: see whether it still runs
            try:
                alive = psutil.Process(self.pid).status() != psutil.STATUS_ZOMBIE
            except psutil.Error:
                alive = False
            if not alive:
                self.code = EXIT_UNKNOWN
            return self.code
        if pid == 0:
            return None
        self.code = os.waitstatus_to_exitcode(status)
        return self.code

    def kill_parent(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.parent.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.parent.wait(timeout=10)


def become_subreaper() -> bool:
    """Make orphaned descendants of this process its children (Linux prctl PR_SET_CHILD_SUBREAPER)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(36, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False
