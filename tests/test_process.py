"""RealProcess on real children: exit seen without reaping, the group swept while the zombie holds its ids, then
reaped; on both platforms' paths (macOS's through the fake libSystem waitid, which translates to the real call)."""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import psutil
import pytest

from protocol import darwin
from supervisor.daemon import system
from supervisor.daemon.system import RealProcess, _libc_waitid_exited, exit_probe

try:  # the lane's own copy, loaded at start-up before os.waitid was removed (tests/fake_macos is on PYTHONPATH)
    from fake_libsystem import FakeLibSystem
except ImportError:
    from tests.fake_macos.fake_libsystem import FakeLibSystem

# The leader starts a sleeper in its own group, prints its pid and exits: the sleeper is a straggler to sweep.
STRAGGLER = """
import subprocess, sys
sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print(sleeper.pid, flush=True)
"""


@pytest.fixture
def fake_darwin(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeLibSystem]:
    """This process looks like macOS CPython 3.11 for the test: no os.waitid, the darwin paths on fake libSystem."""
    library, before = FakeLibSystem(), darwin._selected
    monkeypatch.delattr(os, "waitid", raising=False)
    darwin.select_darwin(library)
    system.exit_probe.cache_clear()
    yield library
    darwin._selected = before
    darwin.darwin.cache_clear()
    system.exit_probe.cache_clear()


def wait_for_exit(proc: RealProcess, timeout: float = 20) -> int:
    deadline = time.monotonic() + timeout
    while (code := proc.poll()) is None:
        assert time.monotonic() < deadline, f"{proc.pid} did not exit"
        time.sleep(0.02)
    return code


def alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


class TestRealProcess:
    """Whichever exit probe this runtime selects (os.waitid here, libSystem waitid in the macOS-shaped lane)."""

    def test_exit_status_and_no_signal_after_reap(self) -> None:
        proc = RealProcess(subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(7)"],
                                            start_new_session=True))
        assert wait_for_exit(proc) == 7
        assert proc.signal_group(15) is False  # reaped: its pgid may belong to a stranger now

    def test_running_then_killed(self) -> None:
        proc = RealProcess(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                                            start_new_session=True))
        assert proc.poll() is None and proc.signal_group(9) is True
        assert wait_for_exit(proc) == -9

    def test_straggler_in_the_group_is_swept_before_the_leader_is_reaped(self) -> None:
        popen = subprocess.Popen([sys.executable, "-c", STRAGGLER], stdout=subprocess.PIPE, start_new_session=True)
        proc = RealProcess(popen)
        assert popen.stdout is not None
        straggler = int(popen.stdout.readline())
        assert wait_for_exit(proc) == 0
        deadline = time.monotonic() + 10
        while alive(straggler) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(straggler)
        popen.stdout.close()

    def test_probe_matches_the_runtime(self) -> None:
        expected = "os.waitid" if hasattr(os, "waitid") else "libSystem waitid (ctypes)"
        assert exit_probe().name == expected


@pytest.mark.linux_only("the fake libSystem reads /proc and calls Linux os.waitid")
@pytest.mark.darwin_real("TestLibSystemWaitid::test_exit_seen_twice_then_reaped")
class TestDarwinExitProbeWithFakeWaitid:
    """Without os.waitid the darwin path calls libSystem's waitid with xnu's constants (fake: real waitid)."""

    def test_fake_darwin_selects_libsystem_waitid_and_supervises_a_child(self, fake_darwin: FakeLibSystem) -> None:
        assert exit_probe().name == "libSystem waitid (ctypes)"
        proc = RealProcess(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"],
                                            start_new_session=True))
        assert proc.poll() is None
        assert wait_for_exit(proc) == 0

    def test_fake_waitid_sees_the_exit_and_leaves_the_zombie_unreaped(self, fake_darwin: FakeLibSystem) -> None:
        calls = darwin.Darwin.from_library(fake_darwin)
        child = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
        deadline = time.monotonic() + 20
        while not _libc_waitid_exited(calls.waitid, child.pid):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert _libc_waitid_exited(calls.waitid, child.pid)  # WNOWAIT: still waitable
        assert child.wait(timeout=10) == 0  # and reaped only now

    def test_fake_waitid_of_a_stranger_is_child_process_error(self, fake_darwin: FakeLibSystem) -> None:
        calls = darwin.Darwin.from_library(fake_darwin)
        with pytest.raises(ChildProcessError):
            _libc_waitid_exited(calls.waitid, 1)

    def test_fake_waitid_refuses_linux_constants(self, fake_darwin: FakeLibSystem) -> None:
        calls = darwin.Darwin.from_library(fake_darwin)
        info = (ctypes.c_char * darwin.SIGINFO_SIZE)()
        linux_wnowait = 0x01000000
        child = subprocess.Popen([sys.executable, "-c", "pass"])
        try:
            assert calls.waitid(darwin.P_PID, child.pid, info, darwin.WEXITED | linux_wnowait) == -1
            assert ctypes.get_errno() == errno.EINVAL
        finally:
            child.wait(timeout=10)
