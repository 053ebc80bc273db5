"""Every darwin path of the project, run for real on a Mac: libSystem's own functions, no fake anywhere.

Each test is marked ``darwin_only`` with the real call it makes, and is skipped elsewhere with that reason. The
macOS-shaped lane (tests/fake_macos/, ``make test-fake-macos``) checks the same facts on Linux with fakes; each fake
test names the test here that checks its fact on a Mac (``darwin_real``, checked by tests/test_platform_marks.py).
The facts are the ones of /work/shared/notes/macos.md (xnu, Libc and CPython sources).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from protocol import darwin
from protocol.durable import write_durably
from protocol.footprint import FootprintUnreadable, phys_footprint, self_footprint
from supervisor import paths
from supervisor.daemon.footprint import GroupSampler, group_pids, pressure_level
from supervisor.daemon.rundir import lock_run_dir, prepare_run_dir
from supervisor.daemon.system import RealProcess, _libc_waitid_exited, exit_probe
from supervisor.tools.launch_agent import AgentUnavailable, throwaway_agent

MiB = 2**20
ALLOCATE = """
import sys, time
size = int(sys.argv[1])
ballast = bytearray(size)
ballast[::4096] = b"\\x01" * len(range(0, size, 4096))
print("ready", flush=True)
time.sleep(120)
"""
# A leader that starts a sleeper in its own group, prints its pid and exits: the sleeper is re-parented to launchd.
ORPHANING_LEADER = """
import subprocess, sys
sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print(sleeper.pid, flush=True)
"""


@pytest.fixture(autouse=True)
def real_libsystem() -> None:
    """No fake is selected: these tests are about the real library."""
    calls = darwin.darwin()
    assert darwin._selected is None and calls is not None, "the darwin paths must run on the real libSystem here"


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Children in their own groups, killed (group-wide) and reaped afterwards, even when the test fails."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def start(children: list[subprocess.Popen[bytes]], script: str, *args: object) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-c", script, *map(str, args)], stdout=subprocess.PIPE,
                            start_new_session=True)
    children.append(proc)
    return proc


def line(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"child {proc.pid} said nothing within {timeout}s"
    return proc.stdout.readline().decode().strip()


@pytest.mark.darwin_only("libproc proc_pid_rusage(pid, RUSAGE_INFO_V2) -> ri_phys_footprint")
class TestProcPidRusage:
    """``proc_pid_rusage``: a child's footprint includes what it touched; gone is ESRCH, another user's EPERM."""

    def test_child_footprint_sees_its_200_mib(self, children: list[subprocess.Popen[bytes]]) -> None:
        child = start(children, ALLOCATE, 200 * MiB)
        assert line(child) == "ready"
        footprint = phys_footprint(child.pid)
        assert footprint is not None and footprint >= 195 * MiB

    def test_own_footprint_grows_with_an_allocation(self) -> None:
        before = self_footprint()
        ballast = bytearray(100 * MiB)
        ballast[::4096] = b"\x01" * len(range(0, len(ballast), 4096))
        assert self_footprint() - before >= 95 * MiB
        del ballast

    def test_gone_pid_is_esrch(self, children: list[subprocess.Popen[bytes]]) -> None:
        child = start(children, "pass")
        child.wait(timeout=20)
        with pytest.raises(FootprintUnreadable) as caught:
            phys_footprint(child.pid)
        assert caught.value.errno == errno.ESRCH

    def test_another_users_process_is_eperm(self) -> None:
        if os.geteuid() == 0:
            pytest.skip("root reads every process")
        with pytest.raises(FootprintUnreadable) as caught:
            phys_footprint(1)  # launchd, root's
        assert caught.value.errno == errno.EPERM

    def test_unreaped_zombie_reads_zero(self, children: list[subprocess.Popen[bytes]]) -> None:
        child = start(children, "pass")
        deadline = time.monotonic() + 20
        while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert phys_footprint(child.pid) == 0


@pytest.mark.darwin_only("libproc proc_listpgrppids(pgid, buffer, bytes)")
class TestProcListpgrppids:
    """``proc_listpgrppids`` lists a process group, an orphan re-parented to launchd included."""

    def test_orphaned_grandchild_stays_in_the_group_listing(self, children: list[subprocess.Popen[bytes]]) -> None:
        leader = start(children, ORPHANING_LEADER)
        sleeper = int(line(leader))
        deadline = time.monotonic() + 20
        while psutil.Process(sleeper).ppid() == leader.pid and time.monotonic() < deadline:
            time.sleep(0.02)  # the leader exits; the sleeper goes to launchd (pid 1)
        assert psutil.Process(sleeper).ppid() == 1
        assert sleeper in group_pids(leader.pid)  # the unreaped leader keeps the group id reserved
        assert sleeper not in [p.pid for p in psutil.Process().children(recursive=True)]

    def test_group_sampler_sums_every_member(self, children: list[subprocess.Popen[bytes]]) -> None:
        child = start(children, ALLOCATE, 64 * MiB)
        assert line(child) == "ready"
        sample = GroupSampler(child.pid).sample(0.0)
        assert sample.complete and sample.pids == 1 and sample.bytes >= 60 * MiB

    def test_no_such_group_is_empty(self, children: list[subprocess.Popen[bytes]]) -> None:
        child = start(children, "pass")
        child.wait(timeout=20)
        assert group_pids(child.pid) == []


@pytest.mark.darwin_only("libSystem waitid(P_PID, pid, &siginfo, WEXITED|WNOHANG|WNOWAIT) through ctypes")
class TestLibSystemWaitid:
    """libSystem's ``waitid`` with xnu's constants: exit seen without reaping; siginfo laid out as macOS's."""

    def test_exit_seen_twice_then_reaped(self, children: list[subprocess.Popen[bytes]]) -> None:
        calls = darwin.darwin()
        assert calls is not None
        child = start(children, "import sys, time; time.sleep(0.3); sys.exit(7)")
        assert _libc_waitid_exited(calls.waitid, child.pid) is False
        deadline = time.monotonic() + 20
        while not _libc_waitid_exited(calls.waitid, child.pid):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert _libc_waitid_exited(calls.waitid, child.pid)  # WNOWAIT: still waitable
        assert child.wait(timeout=10) == 7

    def test_siginfo_layout_is_xnus(self, children: list[subprocess.Popen[bytes]]) -> None:
        calls = darwin.darwin()
        assert calls is not None
        child = start(children, "import sys; sys.exit(7)")
        info = (ctypes.c_char * darwin.SIGINFO_SIZE)()
        deadline = time.monotonic() + 20
        while True:
            assert calls.waitid(darwin.P_PID, child.pid, info, darwin.WEXITED | darwin.WNOHANG | darwin.WNOWAIT) == 0
            if ctypes.c_int.from_buffer(info, darwin.SI_PID_OFFSET).value == child.pid:
                break
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert ctypes.c_int.from_buffer(info, 0).value == 20  # SIGCHLD is 20 on macOS
        assert ctypes.c_int.from_buffer(info, 8).value == 1  # CLD_EXITED
        assert ctypes.c_int.from_buffer(info, 20).value == 7  # si_status
        assert child.wait(timeout=10) == 7

    def test_a_stranger_is_echild(self) -> None:
        calls = darwin.darwin()
        assert calls is not None
        with pytest.raises(ChildProcessError):
            _libc_waitid_exited(calls.waitid, 1)

    def test_this_pythons_exit_probe_supervises_a_straggler(self, children: list[subprocess.Popen[bytes]]) -> None:
        expected = "os.waitid" if hasattr(os, "waitid") else "libSystem waitid (ctypes)"
        assert exit_probe().name == expected  # os.waitid exists on macOS from Python 3.13 only (gh-113536)
        popen = subprocess.Popen([sys.executable, "-c", ORPHANING_LEADER], stdout=subprocess.PIPE,
                                 start_new_session=True)
        children.append(popen)
        proc = RealProcess(popen)
        straggler = int(line(popen))
        deadline = time.monotonic() + 20
        while proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        while psutil.pid_exists(straggler) and psutil.Process(straggler).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the group was not swept before the leader was reaped"
            time.sleep(0.05)


@pytest.mark.darwin_only("sysctlbyname(\"kern.memorystatus_vm_pressure_level\")")
class TestPressureLevel:
    """The pressure sysctl reads unprivileged, as 1, 2 or 4, and agrees with sysctl(8)."""

    def test_pressure_level_reads_and_matches_sysctl(self) -> None:
        level = pressure_level()
        assert level in (1, 2, 4)
        shown = subprocess.run(["sysctl", "-n", "kern.memorystatus_vm_pressure_level"], capture_output=True,
                               text=True, timeout=10, check=True).stdout.strip()
        assert int(shown) in (1, 2, 4)


def _file_system(path: Path) -> str:
    return subprocess.run(["stat", "-f", "%T", str(path)], capture_output=True, text=True, timeout=10,
                          check=True).stdout.strip()


@pytest.mark.darwin_only("fcntl(fd, F_FULLFSYNC) on APFS")
class TestFullFsync:
    """F_FULLFSYNC (51) works on APFS files and directories, so durable writes never fall back to fsync."""

    def test_f_fullfsync_on_an_apfs_file_and_directory(self, tmp_path: Path) -> None:
        assert fcntl.F_FULLFSYNC == 51
        if _file_system(tmp_path) != "apfs":
            pytest.skip(f"{tmp_path} is on {_file_system(tmp_path)}, not APFS")
        target = tmp_path / "f"
        with open(target, "wb") as fh:
            fh.write(b"x" * 4096)
            fh.flush()
            assert fcntl.fcntl(fh.fileno(), fcntl.F_FULLFSYNC) == 0
        fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            assert fcntl.fcntl(fd, fcntl.F_FULLFSYNC) == 0
        finally:
            os.close(fd)

    def test_durable_write_never_falls_back_to_fsync(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        fsyncs: list[int] = []
        real_fsync = os.fsync
        monkeypatch.setattr(os, "fsync", lambda fd: (fsyncs.append(fd), real_fsync(fd))[1])
        write_durably(tmp_path / "summary.json", "{}\n")
        assert (tmp_path / "summary.json").read_text() == "{}\n" and fsyncs == []


@pytest.mark.darwin_only("confstr(_CS_DARWIN_USER_TEMP_DIR = 65537) and a Unix socket bound in the run dir")
class TestRunDir:
    """The run dir is under the per-user $TMPDIR that confstr(65537) names, and its sockets fit sun_path (104)."""

    def test_confstr_65537_is_the_per_user_tmpdir(self) -> None:
        value = os.confstr(darwin.CS_DARWIN_USER_TEMP_DIR)
        assert value and value.startswith("/var/folders/") and value.rstrip("/").endswith("/T")
        tmpdir = os.environ.get("TMPDIR")
        if tmpdir:
            assert os.path.realpath(tmpdir) == os.path.realpath(value)

    def test_default_run_dir_is_under_tmpdir_and_its_sockets_bind(self) -> None:
        temp = paths.darwin_user_temp_dir()
        assert temp is not None and paths.default_run_dir() == temp / "mlxsup"
        run_dir = prepare_run_dir(temp / f"mlxsup-test-{os.getpid()}")  # not the real daemon's
        lock = lock_run_dir(run_dir)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            for name in paths.IPC_SOCKETS:
                assert paths.socket_path_problem(run_dir / name) is None
            sock.bind(str(run_dir / "control.sock"))
            assert run_dir.stat().st_mode & 0o777 == 0o700
        finally:
            sock.close()
            lock.close()
            for entry in run_dir.iterdir():
                entry.unlink()
            run_dir.rmdir()

    def test_sun_path_is_104_bytes_with_its_nul(self, tmp_path: Path) -> None:
        assert paths.socket_path_limit() == 104
        base = Path("/tmp") / f"s{os.getpid()}"
        base.mkdir()
        try:
            for length, fits in ((103, True), (104, False)):
                path = str(base) + "/" + "x" * (length - len(str(base)) - 1)
                assert len(path) == length
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    if fits:
                        sock.bind(path)
                    else:
                        with pytest.raises(OSError):
                            sock.bind(path)
                finally:
                    sock.close()
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
        finally:
            base.rmdir()


@pytest.mark.darwin_only("launchctl bootstrap/print/bootout gui/$UID/<throwaway label>")
class TestLaunchctl:
    """A throwaway LaunchAgent: bootstrapped, printed running with its ProcessType, booted out and gone."""

    def test_bootstrap_print_bootout_of_a_throwaway_agent(self, tmp_path: Path) -> None:
        marker = tmp_path / "ran"
        program = [sys.executable, "-c", f"import pathlib, time; pathlib.Path({str(marker)!r}).write_text('ok'); "
                   "time.sleep(60)"]
        try:
            context = throwaway_agent(program, tmp_path, process_type="Interactive")
            agent = context.__enter__()
        except AgentUnavailable as exc:
            pytest.skip(str(exc))
        with contextlib.ExitStack() as stack:
            stack.push(context)  # boots the agent out and deletes its plist, even when an assertion fails
            deadline = time.monotonic() + 30
            while not marker.exists():
                assert time.monotonic() < deadline, f"the agent never ran: {agent.printed()[-2000:]}"
                time.sleep(0.1)
            state = agent.state()
            assert state.loaded and state.running and state.pid is not None
            assert agent.process_type() in ("Interactive", None)  # None: this launchctl prints no spawn type
            pid = state.pid
        assert not agent.loaded()  # bootout waited until the job left gui/$UID
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
