"""Footprints measured from outside, on real processes; macOS APIs only through fakes named as such."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest

from protocol import footprint as protocol_footprint
from protocol.darwin import is_macos
from protocol.footprint import RUSAGE_INFO_V2, self_footprint
from supervisor.daemon import footprint
from supervisor.daemon.footprint import GroupSample, GroupSampler, pressure_level, process_footprint, system_memory

try:  # in the macOS-shaped lane its sitecustomize already imported it under this name, before os.waitid went
    from fake_libsystem import FakeLibSystem, darwin_selected
except ImportError:
    from tests.fake_macos.fake_libsystem import FakeLibSystem, darwin_selected

MiB = 1024 * 1024
PAGE = 4096

# Allocates argv[1] bytes and touches every page (calloc'd pages cost nothing until written), then idles.
ALLOCATE = """
import sys, time
size = int(sys.argv[1])
ballast = bytearray(size)
ballast[::4096] = b"\\x01" * len(range(0, size, 4096))
print("ready", flush=True)
time.sleep(120)
"""

# A worker stand-in that starts and reaps an allocating grandchild when told to on stdin.
PARENT = """
import subprocess, sys
grandchild = None
for line in sys.stdin:
    if line.strip() == "spawn":
        argv = [sys.executable, "-c", sys.argv[1], sys.argv[2]]
        grandchild = subprocess.Popen(argv, stdout=subprocess.PIPE)
        assert grandchild.stdout.readline() == b"ready\\n"
        print(grandchild.pid, flush=True)
    elif line.strip() == "reap":
        print(grandchild.wait(), flush=True)
"""

Spawn = Callable[..., "subprocess.Popen[bytes]"]


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """Start `python -c SCRIPT ARGS...` in its own session; its whole group is killed and reaped after."""
    started: list[subprocess.Popen[bytes]] = []

    def start(script: str, *args: object) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-c", script, *map(str, args)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        started.append(proc)
        return proc

    yield start
    for proc in started:
        # Only an unreaped leader keeps its group id reserved: never signal a group we already reaped.
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()


def read_line(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> str:
    """The child's next stdout line, failing the test instead of hanging when it never comes."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"child {proc.pid} said nothing within {timeout}s"
    line = proc.stdout.readline().decode()
    assert line, f"child {proc.pid} exited (status {proc.poll()})"
    return line.strip()


def tell(proc: subprocess.Popen[bytes], command: str) -> str:
    assert proc.stdin is not None
    proc.stdin.write(command.encode() + b"\n")
    proc.stdin.flush()
    return read_line(proc)


def touched(size: int) -> bytearray:
    ballast = bytearray(size)
    ballast[::PAGE] = b"\x01" * len(range(0, size, PAGE))
    return ballast


def own_reference() -> int:
    """What self_footprint should agree with: RSS, or on macOS the physical footprint libproc reports."""
    if is_macos():
        value = process_footprint(os.getpid())
        assert value is not None
        return value
    return int(psutil.Process().memory_info().rss)


class TestProcessFootprint:
    """process_footprint of real processes, live and dead."""

    def test_child_allocating_200mb_measures_at_least_200mb(self, spawn: Spawn) -> None:
        child = spawn(ALLOCATE, 200 * MiB)
        assert read_line(child) == "ready"
        value = process_footprint(child.pid)
        assert value is not None
        assert value >= 200 * MiB

    def test_dead_pid_is_none(self, spawn: Spawn) -> None:
        child = spawn("pass")
        child.wait(timeout=10)
        assert process_footprint(child.pid) is None

    def test_own_pid_agrees_with_psutil(self) -> None:
        value = process_footprint(os.getpid())
        assert value is not None
        assert value == pytest.approx(own_reference(), rel=0.1)


class TestGroupSampler:
    """GroupSampler over a real worker stand-in and its grandchild."""

    GRANDCHILD = 100 * MiB

    def test_sums_leader_and_grandchild(self, spawn: Spawn) -> None:
        leader = spawn(PARENT, ALLOCATE, self.GRANDCHILD)
        grandchild = int(tell(leader, "spawn"))
        sample = GroupSampler(leader.pid).sample(time.monotonic())
        assert sample.complete
        assert sample.pids == 2
        assert sample.bytes >= self.GRANDCHILD
        parts = [process_footprint(leader.pid), process_footprint(grandchild)]
        assert None not in parts
        assert sample.bytes == pytest.approx(sum(p for p in parts if p is not None), rel=0.05)

    def test_descendants_rescanned_at_most_every_interval(self, spawn: Spawn) -> None:
        leader = spawn(PARENT, ALLOCATE, self.GRANDCHILD)
        sampler = GroupSampler(leader.pid, refresh_interval=10.0)
        assert sampler.sample(100.0).pids == 1
        tell(leader, "spawn")
        before_rescan = sampler.sample(109.9)
        assert (before_rescan.pids, before_rescan.complete) == (1, True)
        assert before_rescan.bytes < self.GRANDCHILD
        after_rescan = sampler.sample(110.0)
        assert (after_rescan.pids, after_rescan.complete) == (2, True)
        assert after_rescan.bytes >= self.GRANDCHILD

    def test_exited_grandchild_costs_one_incomplete_sample(self, spawn: Spawn) -> None:
        leader = spawn(PARENT, ALLOCATE, self.GRANDCHILD)
        grandchild = int(tell(leader, "spawn"))
        sampler = GroupSampler(leader.pid, refresh_interval=60.0)
        assert sampler.sample(0.0).pids == 2
        os.kill(grandchild, signal.SIGKILL)
        assert tell(leader, "reap") == str(-signal.SIGKILL)
        stale = sampler.sample(1.0)  # the cached list still names the grandchild
        assert (stale.pids, stale.complete) == (1, False)
        rescanned = sampler.sample(1.1)  # an incomplete sample forces a rescan despite the 60 s interval
        assert (rescanned.pids, rescanned.complete) == (1, True)
        assert rescanned.bytes < self.GRANDCHILD

    def test_dead_leader_is_never_complete(self, spawn: Spawn) -> None:
        leader = spawn(PARENT, ALLOCATE, self.GRANDCHILD)
        tell(leader, "spawn")
        sampler = GroupSampler(leader.pid, refresh_interval=60.0)
        assert sampler.sample(0.0).pids == 2
        os.killpg(leader.pid, signal.SIGKILL)
        leader.wait(timeout=10)
        assert not sampler.sample(1.0).complete
        # A killed member frees its memory (that takes a moment on a busy machine), then stays a zombie of 0 bytes
        # until init reaps it: never complete on the way.
        samples = [sampler.sample(2.0)]
        deadline = time.monotonic() + 10
        while samples[-1].bytes and time.monotonic() < deadline:
            time.sleep(0.05)
            samples.append(sampler.sample(2.0 + len(samples)))
        assert not any(s.complete for s in samples) and samples[-1].bytes == 0

    @pytest.mark.linux_only("reads /proc/PID/statm")
    def test_statm_reads_agree_with_psutil_and_stop_at_the_reaped_process(self, spawn: Spawn) -> None:
        """On Linux a member's RSS is one pread of its statm, kept open: what psutil reads, and never a recycled
        pid's once the process is reaped. Without procfs the sampler reads through psutil."""
        leader = spawn(PARENT, ALLOCATE, self.GRANDCHILD)
        tell(leader, "spawn")
        sampler, fallback = GroupSampler(leader.pid), GroupSampler(leader.pid)
        fallback._procfs = False
        with_statm, with_psutil = sampler.sample(0.0), fallback.sample(0.0)
        assert (with_statm.pids, with_statm.complete) == (2, True) == (with_psutil.pids, with_psutil.complete)
        assert with_statm.bytes == pytest.approx(with_psutil.bytes, rel=0.05)
        assert len(sampler._statm) == (2 if sampler._procfs else 0)
        os.killpg(leader.pid, signal.SIGKILL)
        leader.wait(timeout=10)
        assert sampler._read(leader.pid) is None  # reaped: the kept descriptor answers ESRCH
        assert leader.pid not in sampler._statm
        sampler.close()
        fallback.close()
        assert sampler._statm == {}

    def test_pid_that_never_existed(self, spawn: Spawn) -> None:
        gone = spawn("pass")
        gone.wait(timeout=10)
        assert GroupSampler(gone.pid).sample(0.0) == GroupSample(bytes=0, pids=0, complete=False)


class TestSelfFootprint:
    """self_footprint: right, cheap, and still ours after a fork."""

    def test_within_10_percent_of_psutil(self) -> None:
        assert self_footprint() == pytest.approx(own_reference(), rel=0.1)

    def test_sees_our_own_allocation(self) -> None:
        before = self_footprint()
        ballast = touched(100 * MiB)
        assert self_footprint() - before >= 95 * MiB
        del ballast

    def test_cost_micro_benchmark(self, capsys: pytest.CaptureFixture[str]) -> None:
        calls = 100_000
        start = time.perf_counter()
        for _ in range(calls):
            self_footprint()
        ours = (time.perf_counter() - start) / calls
        proc = psutil.Process()
        start = time.perf_counter()
        for _ in range(calls // 10):
            proc.memory_info()
        theirs = (time.perf_counter() - start) / (calls // 10)
        with capsys.disabled():
            print(f"\nself_footprint: {ours * 1e6:.2f} µs/call (psutil memory_info: {theirs * 1e6:.2f} µs)")

    @pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
    def test_forked_child_reports_its_own_memory_not_the_parents(self) -> None:
        ballast = touched(200 * MiB)
        parent = self_footprint()  # caches the parent's reader before the fork
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            status = 1
            try:
                del ballast  # the child unmaps its copy; the parent keeps its own
                os.write(write_end, f"{self_footprint()} {own_reference()}".encode())
                status = 0
            finally:
                os._exit(status)
        os.close(write_end)
        report = os.read(read_end, 100).decode()
        os.close(read_end)
        assert os.waitpid(pid, 0)[1] == 0
        child, child_reference = map(int, report.split())
        assert child == pytest.approx(child_reference, rel=0.1)
        assert child < parent - 150 * MiB
        del ballast


class TestMacosApisWithFakes:
    """The macOS ctypes paths, driven by Python fakes of the C functions (runs on every platform)."""

    @pytest.mark.darwin_real("TestProcPidRusage::test_child_footprint_sees_its_200_mib")
    def test_rusage_info_v2_layout_matches_sys_resource_h(self) -> None:
        struct = protocol_footprint._rusage_info_v2_type()
        assert ctypes.sizeof(struct) == 16 + 18 * 8
        assert struct.ri_resident_size.offset == 64
        assert struct.ri_phys_footprint.offset == 72
        assert struct.ri_diskio_byteswritten.offset == 152
        assert RUSAGE_INFO_V2 == 2

    @pytest.mark.darwin_real("TestProcPidRusage::test_child_footprint_sees_its_200_mib")
    def test_macos_phys_footprint_read_from_fake_libproc(self) -> None:
        calls: list[tuple[int, int]] = []

        def fake_proc_pid_rusage(pid: int, flavor: int, buffer: Any) -> int:
            calls.append((pid, flavor))
            address = ctypes.cast(buffer, ctypes.c_void_p).value
            assert address is not None
            # Write where the C struct keeps the fields, independently of our ctypes mirror.
            ctypes.c_uint64.from_address(address + 64).value = 111  # ri_resident_size
            ctypes.c_uint64.from_address(address + 72).value = 3 * 1024**3 + 5  # ri_phys_footprint
            return 0

        assert protocol_footprint._macos_phys_footprint(4242, fake_proc_pid_rusage) == 3 * 1024**3 + 5
        assert calls == [(4242, 2)]

    @pytest.mark.darwin_real("TestProcPidRusage::test_gone_pid_is_esrch")
    def test_macos_phys_footprint_raises_when_fake_libproc_fails(self) -> None:
        with pytest.raises(protocol_footprint.FootprintUnreadable):
            protocol_footprint._macos_phys_footprint(4242, lambda pid, flavor, buffer: -1)

    @pytest.mark.darwin_real("TestPressureLevel::test_pressure_level_reads_and_matches_sysctl")
    def test_macos_pressure_level_read_from_fake_sysctlbyname(self) -> None:
        def fake_sysctlbyname(name: bytes, old: Any, old_size: Any, new: Any, new_size: int) -> int:
            assert name == b"kern.memorystatus_vm_pressure_level"
            assert (new, new_size) == (None, 0)
            size = ctypes.cast(old_size, ctypes.POINTER(ctypes.c_size_t)).contents
            assert size.value == ctypes.sizeof(ctypes.c_int)
            ctypes.cast(old, ctypes.POINTER(ctypes.c_int)).contents.value = 4
            return 0

        assert footprint._macos_pressure_level(fake_sysctlbyname) == 4

    @pytest.mark.darwin_real("TestPressureLevel::test_pressure_level_reads_and_matches_sysctl")
    def test_macos_pressure_level_is_none_when_fake_sysctlbyname_fails(self) -> None:
        assert footprint._macos_pressure_level(lambda *args: -1) is None


@pytest.mark.darwin_real("TestProcListpgrppids::test_orphaned_grandchild_stays_in_the_group_listing")
class TestMacosGroupListingWithFakes:
    """``_macos_group_pids`` with a plain Python fake of ``proc_listpgrppids(pgid, buffer, bytes)``: it answers how
    many pids it wrote, at most what fits, and 0 on error or for no such group (libproc.h)."""

    @staticmethod
    def fake_listing(group: list[int], calls: list[tuple[int, int]]) -> Callable[[int, Any, int], int]:
        def fake_proc_listpgrppids(pgid: int, buffer: Any, size: int) -> int:
            calls.append((pgid, size))
            written = group[: size // ctypes.sizeof(ctypes.c_int)]
            buffer[: len(written)] = written
            return len(written)

        return fake_proc_listpgrppids

    def test_fake_listing_returns_the_group_pids(self) -> None:
        calls: list[tuple[int, int]] = []
        pids = footprint._macos_group_pids(4242, self.fake_listing([4242, 4250, 4251], calls))
        assert pids == [4242, 4250, 4251]
        assert calls == [(4242, 64 * ctypes.sizeof(ctypes.c_int))]

    def test_fake_listing_full_buffer_is_asked_again_larger(self) -> None:
        group = list(range(5000, 5300))  # 300 pids: 64 and 256 fill up, 1024 does not
        calls: list[tuple[int, int]] = []
        assert footprint._macos_group_pids(5000, self.fake_listing(group, calls)) == group
        assert [size // ctypes.sizeof(ctypes.c_int) for _, size in calls] == [64, 256, 1024]

    def test_fake_listing_error_or_no_group_is_empty(self) -> None:
        calls: list[tuple[int, int]] = []
        assert footprint._macos_group_pids(7, self.fake_listing([], calls)) == []
        assert footprint._macos_group_pids(7, lambda pgid, buffer, size: 0) == []
        assert len(calls) == 1  # 0 is an answer, not a full buffer

    def test_fake_listing_never_reads_more_than_max_group(self) -> None:
        calls: list[tuple[int, int]] = []
        group = list(range(1, 4 * footprint._MAX_GROUP + 1))  # a fork bomb's worth: always fills the buffer
        pids = footprint._macos_group_pids(1, self.fake_listing(group, calls))
        assert pids == group[: footprint._MAX_GROUP]
        capacities = [size // ctypes.sizeof(ctypes.c_int) for _, size in calls]
        assert capacities == [64, 256, 1024, 4096, 16384, footprint._MAX_GROUP]  # then it stops asking


@pytest.mark.linux_only("the fake libSystem reads /proc and calls Linux os.waitid")
@pytest.mark.darwin_real("TestProcPidRusage::test_another_users_process_is_eperm")
class TestPermissionDeniedWithFakeLibproc:
    """EPERM from ``proc_pid_rusage`` (another user's process, and we are not root), through FakeLibSystem."""

    @pytest.fixture
    def as_stranger(self) -> Iterator[None]:
        """The darwin paths with a fake libSystem that takes us for another uid than the one owning our children."""
        with darwin_selected(as_uid=os.geteuid() + 1 if os.geteuid() else 1):
            yield

    def test_fake_eperm_is_unreadable_and_the_group_sample_incomplete(self, spawn: Spawn,
                                                                       as_stranger: None) -> None:
        child = spawn(ALLOCATE, MiB)
        assert read_line(child) == "ready"
        with pytest.raises(protocol_footprint.FootprintUnreadable) as caught:
            protocol_footprint.phys_footprint(child.pid)
        assert caught.value.errno == errno.EPERM
        assert process_footprint(child.pid) is None  # never RSS mixed in instead
        sample = GroupSampler(child.pid).sample(0.0)
        assert sample == GroupSample(0, 0, False)

    def test_fake_same_uid_control_reads_the_same_child(self, spawn: Spawn) -> None:
        child = spawn(ALLOCATE, MiB)
        assert read_line(child) == "ready"
        with darwin_selected():
            sample = GroupSampler(child.pid).sample(0.0)
        assert sample.complete and sample.pids == 1 and sample.bytes >= MiB


@pytest.mark.linux_only("the fake libSystem reads /proc and calls Linux os.waitid")
@pytest.mark.darwin_real("TestProcListpgrppids::test_group_sampler_sums_every_member")
class TestGroupSamplerOnFakeDarwin:
    """On darwin the sampler reads every member's physical footprint through libproc, never procfs (``_Statm`` and
    its /proc/<pid>/statm are Linux's), with a fake libproc whose footprints no other measure could give."""

    class MarkedLibSystem(FakeLibSystem):
        """FakeLibSystem whose ``ri_phys_footprint`` is 7 GiB + pid, so a sum of these came through libproc."""

        def _rusage(self, pid: int, flavor: int, buffer: int | None) -> int:
            result = super()._rusage(pid, flavor, buffer)
            if result == 0 and buffer:
                ctypes.c_uint64.from_address(buffer + 72).value = 7 * 1024**3 + pid
            return result

    def test_fake_darwin_sampler_reads_phys_footprint_and_never_opens_proc(
            self, spawn: Spawn, monkeypatch: pytest.MonkeyPatch) -> None:
        leader = spawn(PARENT, ALLOCATE, MiB)
        grandchild = int(tell(leader, "spawn"))
        opened: list[str] = []
        real_open = os.open

        def watched_open(path: Any, *args: Any, **kwargs: Any) -> int:
            opened.append(str(path))
            return real_open(path, *args, **kwargs)

        with darwin_selected(library=self.MarkedLibSystem()):
            sampler = GroupSampler(leader.pid)
            monkeypatch.setattr(os, "open", watched_open)
            sample = sampler.sample(0.0)
            monkeypatch.undo()
        assert sampler._macos and not sampler._procfs
        assert sample == GroupSample(2 * 7 * 1024**3 + leader.pid + grandchild, 2, True)
        assert sampler._statm == {} and not [path for path in opened if path.startswith("/proc")]


class TestMachine:
    """system_memory, pressure_level, and what importing the module costs."""

    def test_system_memory(self) -> None:
        available, total = system_memory()
        assert 0 < available <= total
        assert total == psutil.virtual_memory().total

    def test_pressure_level(self) -> None:
        if is_macos():
            assert pressure_level() in (1, 2, 4)
        else:
            assert pressure_level() is None

    def test_import_pulls_in_neither_ctypes_nor_mlx(self) -> None:
        probe = "import sys, supervisor.daemon.footprint; print(sorted({'ctypes', 'mlx'} & set(sys.modules)))"
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run([sys.executable, "-c", probe], cwd=root, capture_output=True, text=True)
        expected = "['ctypes']" if is_macos() else "[]"  # macOS (or the lane's fakes) loads libSystem via ctypes
        assert (out.returncode, out.stdout.strip()) == (0, expected), out.stderr
