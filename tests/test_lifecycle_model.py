"""Model-based test: random interleavings of operator requests, config updates, shutdown, worker behaviour and
memory samples, driving the real DaemonService and Jobs on a fake OS, with the lifecycle's invariants checked
after every step. Job "a" is a plain job, job "g" a gang of two ranks on one host, job "q" a command with
sdk = "auto" (guard-only until it says hello, if it ever does), job "s" a plain job with standby = "auto" (its
workers' hellos list the feature; its standbys say standby, die, or break the protocol). ``MLXSUP_MODEL_EXAMPLES``
sets the number of examples (make test: 200; make faults: 3000).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from protocol import Command, Goodbye, Hello, Standby, Step, decode
from protocol.control import ControlError
from supervisor.config import load_config, write_config
from supervisor.core.states import TERMINAL_STATES, JobState
from supervisor.daemon import standby as standby_link
from supervisor.daemon.exits import EXIT_GRACE
from supervisor.daemon.job import Job
from supervisor.daemon.server import DaemonService
from tests.fakeos import FakeProcess, FakeSystem

MiB = 2**20
NAMES = ("a", "g", "q", "s")
RANKS = {"a": (0,), "g": (0, 1), "q": (0,), "s": (0,)}
AUTO = {"command": ["python", "train.py"], "sdk": "auto"}
SDK_WORDS = {"batch", "accum", "next_batch", "next_accum", "step", "checkpoint", "from_checkpoint", "goodbye"}
GUARD_REASONS = {"leak", "spike", "kill_ceiling", "system_floor"}
JOB = {"budget": "1000MiB", "warn": "85%", "kill": "110%", "checkpoint_timeout": 5.0, "kill_grace": 2.0,
       "hang_timeout": 10.0, "startup_timeout": 10.0, "backoff_initial": 0.5, "backoff_max": 2.0,
       "max_attempts_without_progress": 3, "batch": 8, "autostart": False}
SHUTDOWN_BOUND = 5.0 + 2.0 + 1.0  # checkpoint_timeout + kill_grace + a margin
LEVELS = {"low": 200 * MiB, "warn": 900 * MiB, "over": 1050 * MiB, "kill": 1200 * MiB}
EXAMPLES = int(os.environ.get("MLXSUP_MODEL_EXAMPLES", "200"))


@pytest.fixture(autouse=True)
def no_orphans() -> None:
    """Nothing real is spawned here."""


@pytest.fixture(autouse=True)
def quiet() -> Iterator[None]:
    """Thousands of examples log hundreds of thousands of events: keep only errors."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    yield
    structlog.reset_defaults()


class DaemonModel(RuleBasedStateMachine):
    """The daemon service and its jobs under arbitrary interleavings."""

    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="mlxsup-m-", dir="/tmp"))
        os.chmod(self.root, 0o700)
        self.system = FakeSystem()
        self.config_names: tuple[str, ...] = NAMES
        self.svc = DaemonService(load_config(self._write(NAMES), total_memory=16 << 30), system=self.system)
        self.daemon = self.svc.daemon
        self.daemon._shutdown_started = False
        self.sent: dict[bytes, list[str]] = {}  # worker identity -> command actions sent to it
        self.stopping_at: float | None = None
        self.checkpoints = 0
        self.guard_records: list[tuple[str, dict[str, Any]]] = []  # what job "q" recorded while guard-only

    def _write(self, names: tuple[str, ...]) -> Path:
        daemon = {"run_dir": str(self.root / "run"), "state_dir": str(self.root / "state")}
        extra: dict[str, dict[str, Any]] = {"g": {"ranks": 2, "gang": {"port": 40000}}, "q": AUTO,
                                            "s": {"standby": "auto"}}
        jobs = {name: {**JOB, **extra.get(name, {})} for name in names}
        return write_config(self.root / "mlxsup.toml", daemon, jobs)

    # -- helpers ------------------------------------------------------------------------------------

    def _job(self, name: str) -> Job | None:
        job = self.daemon.jobs.get(name)
        if job is not None and job.send_frame != self._capture:
            job.send_frame = self._capture
            if name == "q":
                job.history_record = self._guard_recorder(job)  # type: ignore[method-assign]
        return job

    def _guard_recorder(self, job: Job) -> Any:
        record = job.history_record

        def recorded(kind: str, **fields: Any) -> None:
            if job.lifecycle.guard_only:
                self.guard_records.append((kind, fields))
            record(kind, **fields)

        return recorded

    def _capture(self, identity: bytes, frame: bytes) -> None:
        message = decode(frame)
        if isinstance(message, Command):
            self.sent.setdefault(identity, []).append(message.action)

    def _current(self, job: Job, rank: int = 0) -> FakeProcess | None:
        if job.life is None:
            return None
        proc = job.procs.get((job.life.id, rank))
        assert proc is None or isinstance(proc, FakeProcess)
        return proc

    def _identity(self, job: Job, rank: int = 0) -> bytes:
        assert job.life is not None
        return f"{job.name}-{job.life.id}-{rank}".encode()

    def _call(self, cmd: str, **args: Any) -> None:
        try:
            self.svc.control.dispatch(cmd, args)
        except ControlError as exc:
            assert exc.code in (ControlError.BAD_STATE, ControlError.BAD_VALUE, ControlError.NO_SUCH_JOB), exc

    def _turn(self, seconds: float) -> None:
        self.system.clock += seconds
        self.daemon._turn(self.system.clock)

    def _live(self, job: Job) -> list[FakeProcess]:
        return [p for p in job.procs.values() if isinstance(p, FakeProcess) and p.code is None]

    # -- operator -----------------------------------------------------------------------------------

    @rule(name=st.sampled_from(NAMES), cmd=st.sampled_from(["start", "stop", "restart", "checkpoint"]))
    def operator(self, name: str, cmd: str) -> None:
        if self._job(name) is not None:
            self._call(cmd, job=name)

    @rule(name=st.sampled_from(NAMES), value=st.sampled_from(["800MiB", "1000MiB", "2GiB"]))
    def budget(self, name: str, value: str) -> None:
        if self._job(name) is not None:
            self._call("budget", job=name, value=value)

    @rule(names=st.sampled_from([(), ("a",), ("g",), ("a", "g"), ("q",), ("s",), ("a", "s"), NAMES]))
    def reread_and_update(self, names: tuple[str, ...]) -> None:
        self._write(names)
        self.config_names = names
        self._call("update")

    @rule()
    def sigterm(self) -> None:
        self.daemon.stopping = True
        if self.stopping_at is None:
            self.stopping_at = self.system.clock

    # -- workers ------------------------------------------------------------------------------------

    @rule(name=st.sampled_from(NAMES), rank=st.sampled_from([0, 1]))
    def hello(self, name: str, rank: int) -> None:
        job = self._job(name)
        proc = self._current(job, rank) if job is not None else None
        if job is None or proc is None or proc.code is not None or rank in job.identities:
            return
        proc.term_exit = 75 if proc.term_exit is None and not proc.signals else proc.term_exit
        features = "census standby" if name == "s" else None
        job.on_hello(Hello(job.tokens[rank], proc.pid, name, self.checkpoints, 1000, job.batch, job.accum,
                           features=features), self._identity(job, rank), self.system.clock)

    @rule(name=st.sampled_from(NAMES), rank=st.sampled_from([0, 1]),
          footprint=st.sampled_from([100 * MiB, 300 * MiB, 600 * MiB]))
    def step(self, name: str, rank: int, footprint: int) -> None:
        job = self._job(name)
        if job is not None and rank in job.identities and job.life is not None:
            step = job.life.ranks[rank].last_step + 1
            job.on_message(Step(step, job.batch, job.accum, 1.0, 0.1, footprint, 0, footprint, footprint),
                           self.system.clock, rank)

    @rule(steps=st.integers(1, 8), standby_bytes=st.sampled_from([30 * MiB, 60 * MiB]))
    def leaking_steps(self, steps: int, standby_bytes: int) -> None:
        """Job "s" runs as a recycling job does: it says hello, then leaks 25 MiB a step from 150 MiB, sampled after
        every step (its standby too, when it has one), and honours a checkpoint-and-exit at the next boundary."""
        job = self._job("s")
        if job is not None and job.life is None and not self.daemon.stopping:
            self._call("start", job="s")  # (refused unless it is startable)
        if job is not None and 0 not in job.identities:
            self.hello("s", 0)
        if job is None or 0 not in job.identities or job.life is None:
            return
        for _ in range(steps):
            step = job.life.ranks[0].last_step + 1
            footprint = 150 * MiB + 25 * MiB * (step - job.life.start_checkpoint)
            job.on_message(Step(step, job.batch, job.accum, 1.0, 0.1, footprint, 0, footprint, footprint),
                           self.system.clock, 0)
            if job.life is None or 0 not in job.identities:
                return
            self._turn(0.05)  # (reaps, ticks)
            if job.life is None or 0 not in job.identities:
                return
            self.sample("s", 0, "low", "low", standby_bytes)
            self.boundary("s")  # a checkpoint-and-exit it was sent is honoured at this boundary
            if job.life is None or 0 not in job.identities:
                return

    def _standby_proc(self, job: Job) -> FakeProcess | None:
        sb = job.lifecycle.standby
        proc = job.procs.get((sb.id, 0)) if sb is not None else None
        assert proc is None or isinstance(proc, FakeProcess)
        return proc

    @rule(what=st.sampled_from(["standby", "standby", "heartbeat", "hello", "die"]))
    def standby_acts(self, what: str) -> None:
        """Job "s"'s standby (while it is one, or made the worker before it said standby) does something."""
        job = self._job("s")
        link = job.standby_link if job is not None else None
        proc = job.procs.get((link.life, 0)) if job is not None and link is not None else None
        if job is None or link is None or not isinstance(proc, FakeProcess) or proc.code is not None:
            return
        identity = f"s-{link.life}-0".encode()
        if what == "die":
            proc.code = 1
            return
        message: Standby | Hello | Any
        if what == "standby":
            message = Standby(link.token, proc.pid, "s", 2)
        elif what == "hello":
            message = Hello(link.token, proc.pid, "s", 0, 1000, job.batch, job.accum)
        else:
            from protocol import Heartbeat
            message = Heartbeat(self.system.clock, link.token)
        handled = standby_link.route(self.daemon.jobs.values(), message, identity, self.system.clock, self._capture)
        assert handled

    @rule(name=st.sampled_from(NAMES))
    def boundary(self, name: str) -> None:
        """The workers reach a step boundary: a checkpoint-and-exit sent to any rank is honoured by every rank
        (through the gang's collective): each says goodbye at the same step and exits 75."""
        job = self._job(name)
        if job is None or job.life is None or not job.identities:
            return
        if not any("checkpoint_exit" in self.sent.get(i, []) for i in job.identities.values()):
            return
        procs = {r: self._current(job, r) for r in job.identities}
        if any(p is None or p.code is not None for p in procs.values()):
            return
        self.checkpoints += 1
        (job.paths.checkpoints / f"ckpt-{self.checkpoints:010d}").mkdir(parents=True, exist_ok=True)
        step = job.life.last_step
        for rank, proc in procs.items():
            assert proc is not None
            job.on_message(Goodbye("asked", step), self.system.clock, rank)
            proc.code = 75

    @rule(name=st.sampled_from(NAMES), rank=st.sampled_from([0, 1]), code=st.sampled_from([0, 75, 1, -9]))
    def exit(self, name: str, rank: int, code: int) -> None:
        job = self._job(name)
        proc = self._current(job, rank) if job is not None else None
        if job is None or proc is None or proc.code is not None or job.life is None:
            return
        asked = any("checkpoint_exit" in self.sent.get(self._identity(job, r), []) for r in RANKS[name])
        first = not job.life.left
        unprovoked = not proc.signals and not asked and first
        stop_requested = job.lifecycle.stop_reason is not None or self.daemon.stopping
        batch = (job.batch, job.accum)
        proc.code = code
        self._turn(0.0)
        if code in (1, -9) and unprovoked and not stop_requested and job.life is None:
            # A crash is followed by a backoff (or FATAL) and never changes the batch.
            assert job.state in (JobState.BACKOFF, JobState.FATAL), job.state
            assert (job.batch, job.accum) == batch
        if code in (1, -9) and unprovoked and job.life is not None:
            # One rank crashed: the others are terminated at once.
            assert all(signal.SIGTERM in p.signals or p.code is not None
                       for p in self._live(job) if p is not proc), [p.signals for p in self._live(job)]

    @rule(name=st.sampled_from(NAMES), rank=st.sampled_from([0, 1]))
    def hang(self, name: str, rank: int) -> None:
        job = self._job(name)
        proc = self._current(job, rank) if job is not None else None
        if proc is not None:
            proc.term_exit = None  # it will ignore SIGTERM (blocked in a step or a collective)

    @rule(name=st.sampled_from(NAMES))
    def departing_exit(self, name: str) -> None:
        job = self._job(name)
        if job is not None:
            for life in job.lifecycle.departing:
                proc = job.procs.get((life, 0))
                if isinstance(proc, FakeProcess) and proc.code is None:
                    proc.code = 75

    @rule(name=st.sampled_from(NAMES), rank=st.sampled_from([0, 1]), level=st.sampled_from(sorted(LEVELS)),
          departing_level=st.sampled_from(sorted(LEVELS)), standby_bytes=st.sampled_from([30 * MiB, 60 * MiB]))
    def sample(self, name: str, rank: int, level: str, departing_level: str, standby_bytes: int) -> None:
        job = self._job(name)
        if job is None:
            return
        current = self._current(job, rank)
        others = [p for r in RANKS[name] if r != rank and (p := self._current(job, r)) is not None]
        if current is not None:
            current.sampled = LEVELS[level]
        for proc in others:
            proc.sampled = min(proc.sampled, LEVELS["low"])  # this rank is the one that grows
        departing = [job.procs[(life, 0)] for life in job.lifecycle.departing if (life, 0) in job.procs]
        for proc in departing:
            assert isinstance(proc, FakeProcess)
            proc.sampled = LEVELS[departing_level]
        live = [p for p in (current, *departing) if isinstance(p, FakeProcess) and p.code is None]
        killed_before = {p.pid for p in live if signal.SIGKILL in p.signals}
        standby = self._standby_proc(job)
        if standby is not None:
            standby.sampled = standby_bytes
        held = standby.sample(self.system.clock).bytes if standby is not None else 0  # (before a kill it may draw)
        job.on_sample(self.system.clock, 8 << 30, 0)
        self._standby_counted(job, current, departing, standby, held)
        total = sum(p.sampled for p in live)
        if total >= job.limits.kill:
            # Current plus departing over the kill ceiling always draws an action; in a gang the budget is per
            # rank, and the action reaches every rank of the life.
            acted = [p for p in live if p.signals and p.signals[-1] in (signal.SIGKILL, signal.SIGTERM)]
            assert acted or any(p.pid in killed_before for p in live), (total, [p.signals for p in live])
            if current is not None and current.code is None and current in acted:
                assert all(p.signals or p.code is not None for p in others), [p.signals for p in others]

    def _standby_counted(self, job: Job, current: FakeProcess | None, departing: list[Any],
                         standby: FakeProcess | None, held: int) -> None:
        """A standby's memory is always counted: in the job's total of a sample, as the departing workers' is."""
        record = job.lifecycle.standby
        if standby is None or record is None:
            return
        assert record.bytes == held, (record, held)
        if current is not None and current.code is None and job.name == "s":
            total = current.sampled + held + sum(p.sample(self.system.clock).bytes for p in departing)
            assert job.lifecycle.last_sampled == total, (job.lifecycle.last_sampled, total)

    @rule(seconds=st.sampled_from([0.05, 0.5, 3.0]))
    def advance(self, seconds: float) -> None:
        self._turn(seconds)

    # -- invariants ---------------------------------------------------------------------------------

    @invariant()
    def one_current_worker_per_rank_and_none_when_terminal(self) -> None:
        for job in self.daemon.jobs.values():
            sb = job.lifecycle.standby
            current = [(rank, p) for (life, rank), p in job.procs.items() if life not in job.lifecycle.departing
                       and (sb is None or life != sb.id) and isinstance(p, FakeProcess) and p.code is None]
            assert len(current) <= len(RANKS[job.name]), job.name
            assert len({rank for rank, _ in current}) == len(current), job.name
            if job.state in TERMINAL_STATES:
                assert job.life is None and not current, (job.name, job.state)

    @invariant()
    def at_most_one_standby_never_a_current_worker(self) -> None:
        for job in self.daemon.jobs.values():
            lc, life = job.lifecycle, job.life
            others = [life_id for (life_id, _), p in job.procs.items() if isinstance(p, FakeProcess) and p.code is None
                      and life_id not in lc.departing and (life is None or life_id != life.id)]
            assert len(others) <= 1, (job.name, others)  # the standby, at most one
            if others:
                assert lc.standby is not None and lc.standby.id == others[0], (job.name, others, lc.standby)
            if job.name != "s":
                assert lc.standby is None and job.standby_link is None, job.name
            link = job.standby_link
            if link is not None and link.go is None:  # a standby, not yet the worker: never taken for one
                assert link.token not in job.tokens.values()
                assert link.identity is None or link.identity not in job.identities.values()
            if lc.standby is not None and life is not None:
                assert lc.standby.id != life.id
            if job.state in TERMINAL_STATES and lc.standby is not None:
                assert lc.standby.killed, (job.name, job.state)
            if job.name == "s":  # (--hypothesis-show-statistics: how often the standby paths ran)
                event(f"standby: started {min(lc.stats.standbys, 3)}+, served {min(lc.stats.standbys_used, 2)}+")

    @invariant()
    def a_guard_only_life_speaks_of_no_batch_step_or_checkpoint(self) -> None:
        for kind, fields in self.guard_records:
            assert not SDK_WORDS & set(fields), (kind, fields)
            if kind == "decision":
                assert fields["action"] in ("terminate", "kill"), fields
            if kind == "restart":
                assert fields["reason"] in GUARD_REASONS | {"restart requested"}, fields
        self.guard_records.clear()
        job = self.daemon.jobs.get("q")
        if job is not None and job.lifecycle.guard_only:
            assert set(job.stats.restart_reasons) <= GUARD_REASONS, job.stats.restart_reasons
            assert not any(self.sent.get(i) for i in job.identities.values())  # nobody to command

    @invariant()
    def a_gang_never_overlaps_two_lives(self) -> None:
        job = self.daemon.jobs.get("g")
        if job is None:
            return
        lives = {life for (life, _), p in job.procs.items() if isinstance(p, FakeProcess) and p.code is None}
        assert len(lives) <= 1, lives
        assert not job.lifecycle.departing
        if job.life is not None and not job.lifecycle.deferred:
            assert all(r.pid for r in job.life.ranks.values())  # every rank of a life was started with it

    @invariant()
    def shutdown_completes_in_time(self) -> None:
        if self.stopping_at is not None and self.system.clock >= self.stopping_at + SHUTDOWN_BOUND:
            self._turn(0.0)
            if any(job.exits for job in self.daemon.jobs.values()):
                # An exit reaped just now without its goodbye waits up to EXIT_GRACE for it (supervisor.daemon.exits)
                self._turn(EXIT_GRACE)
            assert self.daemon._done(True), {n: j.state.name for n, j in self.daemon.jobs.items()}

    def teardown(self) -> None:
        try:
            self.sigterm()
            for _ in range(int(SHUTDOWN_BOUND / 0.5) + 2):
                self._turn(0.5)
            assert self.daemon._done(True)
            unreaped = [p.pid for p in self.system.procs if not p.reaped]
            assert not unreaped, f"processes never reaped: {unreaped}"
        finally:
            self.svc.close()
            shutil.rmtree(self.root, ignore_errors=True)


DaemonModel.TestCase.settings = settings(
    max_examples=EXAMPLES, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestDaemonModel = pytest.mark.timeout(1800)(DaemonModel.TestCase)
