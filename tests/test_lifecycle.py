"""The job lifecycle and the daemon service around it, on a fake OS: the regressions of issue 11, one each.

Each test here reproduces a defect the lifecycle used to have (numbered as in the issue) with the daemon's
own classes, and would fail against the code before the reducer.
"""

from __future__ import annotations

import itertools
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import zmq

from protocol import Goodbye, Hello, Step
from protocol.control import ControlError
from supervisor.config import JobConfig, load_config, write_config
from supervisor.core.policy import Limits
from supervisor.core.states import JobState
from supervisor.daemon.job import Job, JobPaths
from supervisor.daemon.recorder import Recorder, read_records
from supervisor.daemon.server import DaemonService
from tests.fakeos import FakeProcess, FakeSystem

MiB = 2**20
_ids = itertools.count(1)


@pytest.fixture(autouse=True)
def no_orphans() -> None:
    """Nothing real is spawned here."""


class Service:
    """A real DaemonService (its control sockets bound in a private run dir) over a fake OS."""

    def __init__(self, tmp_path: Path, run_dir: Path, jobs: dict[str, dict[str, Any]], **daemon: Any) -> None:
        self.tmp_path, self.run_dir, self.daemon_options = tmp_path, run_dir, daemon
        self.system = FakeSystem()
        self.svc = DaemonService(load_config(self.write(jobs), total_memory=16 << 30), system=self.system)
        self.daemon = self.svc.daemon
        self.daemon._shutdown_started = False

    def write(self, jobs: dict[str, dict[str, Any]]) -> Path:
        daemon = {"run_dir": str(self.run_dir), "state_dir": str(self.tmp_path / "state"), **self.daemon_options}
        return write_config(self.tmp_path / "mlxsup.toml", daemon, {
            name: {"budget": "1000MiB", "checkpoint_timeout": 5.0, "kill_grace": 2.0, **job}
            for name, job in jobs.items()})

    def call(self, cmd: str, **args: Any) -> Any:
        return self.svc.control.dispatch(cmd, args)

    def job(self, name: str) -> Job:
        return self.daemon.jobs[name]

    def proc(self, name: str) -> FakeProcess:
        job = self.job(name)
        assert job.life is not None
        proc = job.procs[(job.life.id, 0)]
        assert isinstance(proc, FakeProcess)
        return proc

    def hello(self, name: str) -> None:
        job, proc = self.job(name), self.proc(name)
        job.on_hello(Hello(job.token, proc.pid, name, 0, 100, job.batch, job.accum), b"id-" + name.encode(),
                     self.system.clock)

    def leave(self, name: str, code: int = 75, reason: str = "checkpointed") -> None:
        """The worker of ``name`` leaves as an SDK worker does: its goodbye, then its exit."""
        job, proc = self.job(name), self.proc(name)
        assert job.life is not None
        job.on_message(Goodbye(reason, job.life.last_step), self.system.clock)
        proc.code = code

    def turn(self, seconds: float = 0.1) -> None:
        self.system.clock += seconds
        self.daemon._turn(self.system.clock)

    def close(self) -> None:
        self.svc.close()


@pytest.fixture
def service(tmp_path: Path, run_dir: Path) -> Any:
    made: list[Service] = []

    def make(jobs: dict[str, dict[str, Any]], **daemon: Any) -> Service:
        made.append(Service(tmp_path, run_dir, jobs, **daemon))
        return made[-1]

    yield make
    for s in made:
        s.close()


class TestShutdown:
    """1. A restart during shutdown no longer starts the job again; start is refused while stopping."""

    def test_restart_then_sigterm_ends_with_the_job_stopped_and_the_daemon_done(self, service: Any) -> None:
        s = service({"j": {}})
        s.job("j").start(s.system.clock)
        s.hello("j")
        s.call("restart", job="j")
        assert s.job("j").state == JobState.STOPPING
        s.daemon.stopping = True  # SIGTERM
        s.turn()
        s.leave("j")  # it checkpointed and left
        s.turn()
        assert s.job("j").state == JobState.STOPPED and len(s.system.procs) == 1
        assert s.daemon._done(True)
        with pytest.raises(ControlError, match="shutting down"):
            s.call("start", job="j")
        assert len(s.system.procs) == 1


class TestRemoveAndReadd:
    """2. A job removed and re-added before its worker exited keeps one entry and one worker."""

    def test_readded_job_waits_for_its_old_worker_then_starts_once(self, service: Any) -> None:
        s = service({"a": {}, "b": {}})
        job = s.job("a")
        job.start(s.system.clock)
        s.hello("a")
        s.write({"b": {}})
        s.call("update")
        assert job.state == JobState.STOPPING and "a" in s.svc.removing
        s.write({"a": {}, "b": {}})
        s.call("update")
        assert s.job("a") is job and "a" not in s.svc.removing
        assert len(s.system.procs) == 1  # no second worker on the same checkpoint directory
        s.leave("a")
        s.turn()
        assert job.state == JobState.STARTING and len(s.system.procs) == 2  # autostart, after the old exit
        assert s.system.procs[0].reaped
        for _ in range(3):
            s.turn()
        assert s.daemon.jobs.get("a") is job  # never dropped once it passes through STOPPED


class TestCrashWhileAskedToCheckpoint:
    """3. A crash while a checkpoint-and-exit is pending is a crash: backoff, batch unchanged."""

    def test_exit_1_after_a_peak_decision_backs_off_at_the_same_batch(self, service: Any) -> None:
        s = service({"j": {"batch": 8, "backoff_initial": 1.0}})
        job = s.job("j")
        job.start(s.system.clock)
        s.hello("j")
        for _ in range(2):
            s.proc("j").sampled = 1050 * MiB
            job.on_sample(s.system.clock, 8 << 30, 0)
        assert job.state == JobState.CHECKPOINTING and job.life is not None
        assert job.life.pending is not None and job.life.pending.next_batch == 4
        s.proc("j").code = 1
        s.turn()
        assert job.state == JobState.BACKOFF and (job.batch, job.accum) == (8, 1)
        assert job.stats.restarts == 0 and len(s.system.procs) == 1
        s.turn(1.1)
        assert job.state == JobState.STARTING and len(s.system.procs) == 2


def broken_paths(tmp_path: Path) -> JobPaths:
    """Paths where every write and scan fails: directories where files should be, a symlink loop."""
    for name in ("history.jsonl", "telemetry.jsonl"):
        (tmp_path / name).mkdir()
    os.symlink("loop", tmp_path / "loop")
    return JobPaths(tmp_path / "loop", tmp_path / "logs", tmp_path / "history.jsonl", tmp_path / "telemetry.jsonl")


class TestWriteFailures:
    """4. Failing history, telemetry and checkpoint-scan I/O is counted and logged, never raised."""

    def test_job_keeps_supervising_and_enforcing_with_every_write_failing(self, tmp_path: Path) -> None:
        system = FakeSystem()
        job = Job("j", JobConfig(), Limits(850 * MiB, 1000 * MiB, 1100 * MiB), broken_paths(tmp_path), system,
                  "ipc://x", lambda identity, frame: None, lambda *a: None)
        job.start(system.clock)
        proc = system.procs[-1]
        job.on_hello(Hello(job.token, proc.pid, "j", 0, 100, 8, 1), b"id", system.clock)
        job.on_message(Step(1, 8, 1, 1.0, 0.1, 100, 0, 100, 100), system.clock)
        job.on_sample(system.clock, 8 << 30, 0)
        job.recorder.close()
        assert job.state == JobState.RUNNING
        assert set(job.io_errors) == {"history", "telemetry", "checkpoint_scan"}
        proc.sampled = 1200 * MiB
        job.on_sample(system.clock, 8 << 30, 0)
        assert proc.signals == [signal.SIGTERM]  # the budget is still enforced
        proc.code = -15
        job.tick(system.clock + 0.1, 8 << 30, 0)
        assert job.state == JobState.STARTING and len(system.procs) == 2


class TestTelemetryRotation:
    """5. telemetry.jsonl rotates like the logs, and readers take a bounded window of its end."""

    def test_rotates_past_max_bytes_and_keeps_keep_files(self, tmp_path: Path) -> None:
        path = tmp_path / "telemetry.jsonl"
        recorder = Recorder(path, flush_every=0.0, max_bytes=20_000, keep=2)
        for step in range(2000):
            recorder.record("step", step=step, padding="x" * 40)
        recorder.close()
        files = sorted(p.name for p in tmp_path.iterdir())
        assert files == ["telemetry.jsonl", "telemetry.jsonl.1", "telemetry.jsonl.2"]
        assert all(p.stat().st_size < 20_000 + 200 for p in tmp_path.iterdir())
        steps = [r["step"] for r in read_records(path)]
        assert steps == list(range(steps[0], 2000))  # the newest records, in order

    def test_read_records_takes_only_the_window(self, tmp_path: Path) -> None:
        path = tmp_path / "telemetry.jsonl"
        recorder = Recorder(path, flush_every=0.0, max_bytes=0)
        for step in range(1000):
            recorder.record("step", step=step)
        recorder.close()
        window = read_records(path, window=1000)
        assert 0 < len(window) < 50 and window[-1]["step"] == 999
        assert [r["step"] for r in window] == list(range(window[0]["step"], 1000))


class TestStopWhileCheckpointing:
    """7. stop during CHECKPOINTING keeps the pending shrink and the deadline."""

    def test_repeated_stops_neither_push_the_deadline_nor_drop_the_shrink(self, service: Any) -> None:
        s = service({"j": {"batch": 8}})
        job = s.job("j")
        job.start(s.system.clock)
        s.hello("j")
        for _ in range(2):
            s.proc("j").sampled = 1050 * MiB
            job.on_sample(s.system.clock, 8 << 30, 0)
        assert job.state == JobState.CHECKPOINTING  # deadline: now + 5 s
        s.turn(2.0)
        s.call("stop", job="j")
        assert job.state == JobState.STOPPING
        s.turn(2.0)
        s.call("stop", job="j")
        s.turn(0.9)
        assert s.proc("j").signals == []
        s.turn(0.2)  # 5.1 s after the decision
        assert s.proc("j").signals == [signal.SIGTERM]
        s.leave("j", reason="stop requested")
        s.turn()
        assert job.state == JobState.STOPPED and (job.batch, job.accum) == (4, 2)


class TestGoodbyeAfterStop:
    """A worker asked to stop that says goodbye is not restarted (no overlap for a stop)."""

    def test_stop_goodbye_exit_is_stopped(self, service: Any) -> None:
        s = service({"j": {}})
        job = s.job("j")
        job.start(s.system.clock)
        s.hello("j")
        s.call("stop", job="j")
        job.on_message(Goodbye("stop requested", 3), s.system.clock)
        assert len(s.system.procs) == 1
        s.proc("j").code = 75
        s.turn()
        assert job.state == JobState.STOPPED and len(s.system.procs) == 1


class _RecordingPoller(zmq.Poller):
    """A real Poller that records the timeout of each poll and returns nothing (the fake clock does not move)."""

    def __init__(self) -> None:
        super().__init__()
        self.timeouts: list[int | None] = []

    def poll(self, timeout: int | None = None) -> list[Any]:
        self.timeouts.append(timeout)
        return []


class TestIdleLoop:
    """A daemon whose jobs are all stopped wakes for its sockets, deadlines and once a second, not at 20 Hz; a
    living job brings the 20 Hz turns back."""

    def test_stopped_jobs_let_the_loop_sleep_up_to_a_second_and_a_started_one_wakes_it_at_the_sample_rate(
            self, service: Any) -> None:
        s = service({"a": {"autostart": False}, "b": {"autostart": False}})
        poller = _RecordingPoller()
        s.daemon._next_heartbeat = s.system.clock
        s.turn(0.0)  # samples, heartbeats and ticks are all done: the next sample is 50 ms away
        s.daemon._wait(poller)
        assert s.daemon._resting() and poller.timeouts[-1] >= 900
        s.call("start", job="a")
        s.turn(0.0)
        assert s.job("a").busy and not s.daemon._resting()
        s.daemon._wait(poller)
        assert poller.timeouts[-1] <= 51


class TestSampleCadence:
    """Far below its budget a running worker is sampled only as often as growth at ``growth_rate`` could reach
    the budget (at most every ``calm_sample_interval``); near it, while starting or after an incomplete sample,
    at ``sample_interval``."""

    def _running(self, service: Any, **daemon: Any) -> Any:
        s = service({"j": {"budget": "8GiB"}}, **daemon)
        s.job("j").start(s.system.clock)
        s.hello("j")
        s.turn(0.0)
        return s

    def _gaps(self, s: Any, seconds: float) -> list[float]:
        """Gaps between the samples taken over ``seconds`` of 10 ms turns."""
        job, times = s.job("j"), []
        for _ in range(round(seconds / 0.01)):
            before = job.sampled_at
            s.turn(0.01)
            if job.sampled_at != before:
                times.append(job.sampled_at)
        return [round(b - a, 3) for a, b in itertools.pairwise(times)]

    def test_far_below_the_budget_samples_every_calm_interval(self, service: Any) -> None:
        s = self._running(service)  # 100 MiB of 8 GiB: 7.9 GiB / 16 GiB/s = 0.49 s, capped at 0.25 s
        assert s.job("j").state == JobState.RUNNING
        assert set(self._gaps(s, 2.0)) == {0.25}

    def test_headroom_over_the_growth_rate_sets_the_gap_in_whole_intervals(self, service: Any) -> None:
        s = self._running(service, growth_rate="40GiB")  # 7.9 GiB / 40 GiB/s = 0.198 s: three 50 ms intervals
        assert set(self._gaps(s, 2.0)) == {0.15}

    def test_near_the_budget_samples_at_the_full_rate(self, service: Any) -> None:
        s = self._running(service)
        s.proc("j").sampled = 7 * 2**30 + 900 * 2**20  # 0.1 GiB of headroom: under one interval at 16 GiB/s
        self._gaps(s, 0.3)  # the first sample after the change sees it
        assert set(self._gaps(s, 1.0)) == {0.05}

    def test_an_incomplete_sample_brings_back_the_full_rate(self, service: Any) -> None:
        s = self._running(service)
        s.proc("j").complete = False
        self._gaps(s, 0.3)
        assert set(self._gaps(s, 1.0)) == {0.05}

    def test_calm_interval_equal_to_the_sample_interval_keeps_20_hz(self, service: Any) -> None:
        s = self._running(service, calm_sample_interval=0.05)
        assert set(self._gaps(s, 1.0)) == {0.05}

    def test_a_worker_spawned_after_the_sample_turn_is_due_at_once(self, service: Any) -> None:
        s = service({"j": {"budget": "8GiB", "autostart": False}})
        s.turn(0.0)
        s.job("j").start(s.system.clock)  # as a tick spawns (a backoff's end, a gang leader's word): never sampled
        poller = _RecordingPoller()
        s.daemon._wait(poller)  # once crashed: the never-sampled worker's due time was -inf
        assert poller.timeouts[-1] == 0

    def test_a_starting_worker_is_sampled_at_the_full_rate(self, service: Any) -> None:
        s = service({"j": {"budget": "8GiB"}})
        s.job("j").start(s.system.clock)  # no hello yet: STARTING
        assert set(self._gaps(s, 1.0)) == {0.05}
