"""Job state machine against a deterministic fake OS (fake clock, fake processes, scripted samples).

The same logic runs against real processes in test_supervise.py; here the timing is exact.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from protocol import Command, Goodbye, Hello, Step, Steps, decode
from supervisor.config import JobConfig
from supervisor.core.policy import Limits
from supervisor.core.states import JobState
from supervisor.daemon.exits import EXIT_GRACE
from supervisor.daemon.job import Job, JobPaths
from tests.fakeos import FakeProcess, FakeSystem

MiB = 2**20


class Harness:
    def __init__(self, tmp_path: Path, telemetry: Path | None = None, **config: Any) -> None:
        self.system = FakeSystem()
        self.sent: list[Command] = []
        self.job = Job("j", JobConfig(**config), Limits(850 * MiB, 1000 * MiB, 1100 * MiB),
                       JobPaths(tmp_path / "ckpt", tmp_path / "logs", None, telemetry), self.system, "ipc://x",
                       lambda identity, frame: self.sent.append(decode(frame)),  # type: ignore[arg-type]
                       lambda *a: None)
        self.job.start(self.system.clock)
        self.hello()

    @property
    def proc(self) -> FakeProcess:
        return self.system.procs[-1]

    def hello(self, step: int = 0) -> None:
        life = self.job.life
        assert life is not None
        hello = Hello(self.job.token, self.proc.pid, "j", step, 1000, life.batch, life.accum)
        self.job.on_hello(hello, b"id", self.system.clock)

    def leave(self, code: int = 75, reason: str = "checkpointed") -> None:
        """The worker leaves as an SDK worker does: its goodbye, then its exit (an exit without a goodbye waits
        up to EXIT_GRACE for it: TestExitGrace)."""
        life = self.job.life
        assert life is not None
        self.job.on_message(Goodbye(reason, life.last_step), self.system.clock)
        self.proc.code = code

    def advance(self, seconds: float) -> None:
        self.system.clock += seconds
        self.job.tick(self.system.clock, 8 << 30, 0)

    def sample(self, sampled: int, complete: bool = True) -> None:
        self.proc.sampled, self.proc.complete = sampled, complete
        self.job.on_sample(self.system.clock, 8 << 30, 0)

    def sample_departing(self) -> None:
        """A sample round in which only the departing workers' footprints changed."""
        self.job.on_sample(self.system.clock, 8 << 30, 0)

    def step(self, step: int, footprint: int = 100 * MiB) -> None:
        life = self.job.life
        assert life is not None
        self.job.on_message(Step(step, life.batch, life.accum, 1.0, 0.01, footprint, 0, footprint, footprint),
                            self.system.clock)

    def steps(self, first: int, count: int, footprint: Callable[[int], int] = lambda step: 100 * MiB) -> None:
        """``count`` held steps from ``first`` as one ``steps`` frame."""
        life = self.job.life
        assert life is not None
        rows = [Step(s, life.batch, life.accum, 1.0, 0.01, footprint(s), 0, footprint(s), footprint(s))
                for s in range(first, first + count)]
        self.job.on_message(Steps.of(rows), self.system.clock)

    def actions(self) -> list[str]:
        return [c.action for c in self.sent if isinstance(c, Command)]


class TestEscalationWithFakeSystem:
    """Warn, budget, deadline and kill ceiling, with exact timing."""

    def test_warn_then_two_samples_over_budget_then_deadline_then_sigkill(self, tmp_path: Path) -> None:
        h = Harness(tmp_path, checkpoint_timeout=5.0, kill_grace=2.0)
        h.sample(900 * MiB)
        assert h.actions() == ["clear_cache"]
        h.sample(1000 * MiB)
        assert h.job.state == JobState.RUNNING  # one sample at budget is not enough
        h.sample(1001 * MiB)
        assert h.actions()[-1] == "checkpoint_exit" and h.job.state == JobState.CHECKPOINTING
        h.advance(4.9)
        assert h.proc.signals == []
        h.advance(0.2)
        assert h.proc.signals == [signal.SIGTERM] and h.job.state == JobState.STOPPING
        h.advance(1.9)
        assert h.proc.signals == [signal.SIGTERM]
        h.advance(0.2)
        assert h.proc.signals == [signal.SIGTERM, signal.SIGKILL]

    def test_kill_ceiling_terminates_at_once(self, tmp_path: Path) -> None:
        h = Harness(tmp_path)
        h.sample(1200 * MiB)
        assert h.proc.signals == [signal.SIGTERM]

    def test_partial_samples_under_the_kill_ceiling_never_act(self, tmp_path: Path) -> None:
        h = Harness(tmp_path)
        for _ in range(5):
            h.sample(1099 * MiB, complete=False)
        assert h.proc.signals == [] and h.actions() == []

    def test_a_partial_sample_over_the_kill_ceiling_acts(self, tmp_path: Path) -> None:
        """Defect 6: a partial sum only under-counts, so one over the ceiling is over for sure."""
        h = Harness(tmp_path)
        h.sample(1200 * MiB, complete=False)
        assert h.proc.signals == [signal.SIGTERM] and h.job.state == JobState.STOPPING

    def test_peak_breach_restarts_with_half_the_batch(self, tmp_path: Path) -> None:
        h = Harness(tmp_path, batch=8)
        h.sample(1050 * MiB)
        h.sample(1050 * MiB)
        h.leave(75)
        h.advance(0.1)
        assert h.job.state == JobState.STARTING and (h.job.batch, h.job.accum) == (4, 2)
        assert len(h.system.procs) == 2


class TestLivenessWithFakeSystem:
    """Hangs, crashes with backoff, and FATAL without progress."""

    def test_hang_is_detected_after_the_timeout(self, tmp_path: Path) -> None:
        h = Harness(tmp_path, hang_timeout=10.0)
        h.step(1)
        h.advance(9.9)
        assert h.proc.signals == []
        h.advance(0.2)
        assert h.proc.signals == [signal.SIGTERM]

    def test_crash_backoff_doubles_and_ends_fatal(self, tmp_path: Path) -> None:
        h = Harness(tmp_path, backoff_initial=1.0, backoff_max=3.0, max_attempts_without_progress=4)
        delays = []
        for _ in range(4):
            h.proc.code = 1
            h.advance(0.0)
            if h.job.state == JobState.FATAL:
                break
            delays.append(h.job.lifecycle.retry_at - h.system.clock)
            h.advance(delays[-1])
            h.hello()
        assert delays == [1.0, 2.0, 3.0]
        assert h.job.state == JobState.FATAL


class TestExitGrace:
    """A worker that said hello and exited cleanly is acted on once its goodbye is read: the daemon's socket may
    deliver the last frames a little after the exit is seen, so the exit waits up to EXIT_GRACE for them."""

    def breach(self, tmp_path: Path) -> Harness:
        h = Harness(tmp_path, batch=8)
        h.sample(1050 * MiB)
        h.sample(1050 * MiB)
        assert h.job.state == JobState.CHECKPOINTING
        h.proc.code = 75  # exited, its goodbye not read yet
        h.advance(0.1)
        assert h.job.state == JobState.CHECKPOINTING and h.proc.reaped
        assert h.job.next_deadline() <= h.system.clock + EXIT_GRACE  # the loop wakes when the wait ends
        return h

    def test_a_goodbye_read_after_the_exit_ends_the_wait_at_once(self, tmp_path: Path) -> None:
        h = self.breach(tmp_path)
        h.job.on_message(Goodbye("checkpointed late", 0), h.system.clock)
        h.advance(0.0)
        assert h.job.state == JobState.STARTING and (h.job.batch, h.job.accum) == (4, 2)
        exits = [e for e in h.job.history.recent(50) if e["event"] == "exit"]
        assert exits[-1]["goodbye"] == "checkpointed late"

    def test_without_a_goodbye_the_exit_is_acted_on_when_the_grace_ends(self, tmp_path: Path) -> None:
        h = self.breach(tmp_path)
        h.advance(EXIT_GRACE - 0.2)
        assert h.job.state == JobState.CHECKPOINTING
        h.advance(0.2)
        assert h.job.state == JobState.STARTING and (h.job.batch, h.job.accum) == (4, 2)

    def test_a_crash_does_not_wait(self, tmp_path: Path) -> None:
        h = Harness(tmp_path)
        h.proc.code = 1
        h.advance(0.0)
        assert h.job.state != JobState.RUNNING and h.proc.reaped


class TestRegrowthWithFakeSystem:
    """A regrown batch that breaches doubles the wait before the next regrowth (AIMD)."""

    def test_failed_regrowth_backs_off(self, tmp_path: Path) -> None:
        h = Harness(tmp_path, batch=8, regrow_after_steps=5)
        h.job.lifecycle.batch, h.job.lifecycle.accum = 4, 2  # as after an earlier shrink
        h.leave(75)
        h.job.life.pending = None  # type: ignore[union-attr]
        h.advance(0.0)
        h.hello()
        for step in range(1, 12):
            h.step(step)
            if h.job.state == JobState.CHECKPOINTING:
                break
        assert h.actions()[-1] == "checkpoint_exit" and h.job.life.pending.next_batch == 8  # type: ignore[union-attr]
        h.leave(75)
        h.advance(0.0)
        h.hello()
        assert h.job.batch == 8
        h.sample(1050 * MiB)
        h.sample(1050 * MiB)
        assert h.job.lifecycle.policy.regrow_after_steps == 10


class TestStepsFramesWithFakeSystem:
    """Held steps in one ``steps`` frame: every row counts, one telemetry line, the policy after the last row."""

    def test_every_row_counts_and_is_recorded_once(self, tmp_path: Path) -> None:
        from supervisor.daemon.recorder import read_records

        telemetry = tmp_path / "telemetry.jsonl"
        h = Harness(tmp_path, telemetry=telemetry)
        h.step(1)
        h.steps(2, 40)
        h.job.recorder.flush()
        assert h.job.lifecycle.stats.steps_completed == 41 and h.job.life.lead.healthy_steps == 41  # type: ignore[union-attr]
        assert h.job.life.lead.estimator.steps_seen == 41  # type: ignore[union-attr]
        assert [line.count('"k":"steps"') for line in telemetry.read_text().splitlines()] == [0, 1]
        records = read_records(telemetry)
        assert [r["step"] for r in records] == list(range(1, 42)) and {r["k"] for r in records} == {"step"}
        assert records[-1]["footprint"] == 100 * MiB and "val_loss" not in records[-1]

    def test_subscribers_get_one_event_per_row_and_nothing_is_built_without_one(self, tmp_path: Path) -> None:
        h = Harness(tmp_path)
        published: list[dict[str, Any]] = []
        subscribed = False
        h.job.publish = lambda job, kind, data: published.append(data) if kind == "telemetry" else None
        h.job.wants = lambda job, kind: subscribed
        h.steps(1, 5)
        assert published == []
        subscribed = True
        h.steps(6, 5)
        assert [event["step"] for event in published] == [6, 7, 8, 9, 10]

    def test_a_leak_predicted_at_the_last_row_recycles_at_once(self, tmp_path: Path) -> None:
        h = Harness(tmp_path)
        for first in range(1, 41, 10):  # calm frames of a 10 MiB/step leak, far below the 1000 MiB budget
            h.steps(first, 10, lambda step: 300 * MiB + 10 * MiB * step)
        assert h.actions() == [] and h.job.state == JobState.RUNNING
        h.steps(41, 10, lambda step: 300 * MiB + 10 * MiB * step + (300 * MiB if step == 50 else 0))
        assert h.actions() == ["checkpoint_exit"] and h.job.state == JobState.CHECKPOINTING


@pytest.fixture(autouse=True)
def no_orphans() -> None:
    """Nothing real is spawned here."""


class TestOverlappedRestartWithFakeSystem:
    """After a requested checkpoint-and-exit the successor starts at the goodbye when its memory fits next to the
    departing worker's, else as soon as it does; the old one is reaped later, or SIGKILLed."""

    def test_successor_waits_for_the_departing_memory_then_the_old_worker_is_killed(self, tmp_path: Path) -> None:
        from protocol import Goodbye

        h = Harness(tmp_path, kill_grace=1.0)
        for step in range(1, 6):
            h.step(step, footprint=100 * MiB)  # a baseline of 100 MiB: what the successor will need
        h.sample(1050 * MiB)
        h.sample(1050 * MiB)
        old = h.proc
        h.job.on_message(Goodbye("peak", 3), h.system.clock)
        assert len(h.system.procs) == 1 and h.job.state == JobState.STARTING and h.job.busy
        old.sampled = 950 * MiB  # tearing down, still too big to fit a successor next to it (budget 1000)
        h.sample_departing()
        assert len(h.system.procs) == 1 and old.signals == []
        old.sampled = 400 * MiB
        h.sample_departing()
        assert len(h.system.procs) == 2 and list(h.job.procs.values()) == [old, h.proc]
        h.advance(1.0)
        assert old.signals == []  # still tearing down: left alone
        h.advance(5.5)
        assert old.signals == [signal.SIGKILL]  # never exited: killed
        old.code = -9
        h.advance(0.1)
        assert h.job.lifecycle.departing == {} and list(h.job.procs.values()) == [h.proc]

    def test_departing_and_current_footprints_add_up_against_the_budget(self, tmp_path: Path) -> None:
        from protocol import Goodbye

        h = Harness(tmp_path)
        h.sample(100 * MiB)  # no baseline yet: the smallest sample of the life is what a successor needs
        h.sample(1050 * MiB)
        h.sample(1050 * MiB)
        old = h.proc
        h.job.on_message(Goodbye("peak", 3), h.system.clock)
        old.sampled = 300 * MiB
        h.sample_departing()  # room: the successor spawns
        h.hello()
        h.sample(750 * MiB)  # 750 + 300 >= budget: the departing worker (its checkpoint is durable) goes
        assert old.signals == [signal.SIGKILL] and h.proc.signals == []
        assert h.job.last_sampled == 1050 * MiB and h.job.state == JobState.RUNNING

    def test_a_worker_that_finishes_instead_is_not_restarted(self, tmp_path: Path) -> None:
        from protocol import Goodbye

        h = Harness(tmp_path)
        h.sample(1050 * MiB)
        h.sample(1050 * MiB)
        h.job.on_message(Goodbye("finished", 1000), h.system.clock)
        assert len(h.system.procs) == 1  # no successor for a finished run
        h.proc.code = 0
        h.advance(0.1)
        assert h.job.state == JobState.FINISHED


class TestGangReapOrderFake:
    """Ranks reaped in one turn: the one a signal killed is the cause, a peer's exit 1 its fall-out."""

    def test_a_sigkilled_rank_reaped_with_its_survivor_is_the_failure(self, tmp_path: Path) -> None:
        from supervisor.daemon.history import read_history
        from supervisor.hostfile import build_layout

        layout = build_layout(2, [], None, "", 30000, ["127.0.0.1"])
        system = FakeSystem()
        job = Job("j", JobConfig(ranks=2), Limits(850 * MiB, 1000 * MiB, 1100 * MiB),
                  JobPaths(tmp_path / "ckpt", tmp_path / "logs", tmp_path / "history.jsonl", None,
                           tmp_path / "ring-j.json"), system, "ipc://x", lambda identity, frame: None,
                  lambda *a: None, layout=layout)
        job.start(system.clock)
        survivor, killed = system.procs[-2:]
        for rank, proc in ((0, survivor), (1, killed)):
            job.on_hello(Hello(job.tokens[rank], proc.pid, "j", 0, 1000, 8, 1), b"id%d" % rank, system.clock)
        killed.code, survivor.code = -signal.SIGKILL, 1  # both gone before the daemon's next turn
        system.clock += 0.1
        job.tick(system.clock, 8 << 30, 0)
        exits = {e["rank"]: e for e in read_history(tmp_path / "history.jsonl") if e["event"] == "rank_exit"}
        assert exits[1]["expected"] is False and exits[1]["signal"] == "SIGKILL"
        assert exits[0]["expected"] is True and "rank 1 killed by signal 9" in exits[0]["cause"]
