"""sdk = "auto": a life is guard-only until its worker says hello, an SDK life from then on (fake OS; the real
daemon runs of both sides are in tests/test_guard.py)."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from protocol.control import ControlError
from supervisor.cli.live import top_frame
from supervisor.config import ConfigError, parse_config
from supervisor.control.commands.jobs import describe, status_line
from supervisor.core.states import JobState
from tests.test_lifecycle import Service

MiB = 2**20
AUTO = {"command": [sys.executable, "train.py"], "sdk": "auto", "startup_timeout": 1.0, "hang_timeout": 1.0,
        "batch": 8}


@pytest.fixture(autouse=True)
def no_orphans() -> None:
    """Nothing real is spawned here."""


@pytest.fixture
def service(tmp_path: Path, run_dir: Path) -> Any:
    made: list[Service] = []

    def make(jobs: dict[str, dict[str, Any]]) -> Service:
        made.append(Service(tmp_path, run_dir, jobs))
        return made[-1]

    yield make
    for s in made:
        s.close()


def breach(s: Service, name: str = "j") -> None:
    job = s.job(name)
    for _ in range(2):
        s.proc(name).sampled = 1050 * MiB
        job.on_sample(s.system.clock, 8 << 30, 0)


class TestConfig:
    """sdk takes true, false or "auto"; bools keep working; anything else names itself."""

    def parse(self, tmp_path: Path, **job: Any) -> Any:
        return parse_config({"jobs": {"j": {"command": ["x"], **job}}}, tmp_path / "c.toml", total_memory=16 << 30)

    def test_auto_true_and_false_are_taken(self, tmp_path: Path) -> None:
        for value in ("auto", True, False):
            assert self.parse(tmp_path, sdk=value).jobs["j"].sdk == value

    def test_another_string_is_refused_by_name(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match=r"sdk = 'yes'.*true, false or \"auto\""):
            self.parse(tmp_path, sdk="yes")

    def test_a_number_is_refused(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match="sdk"):
            self.parse(tmp_path, sdk=1.5)

    def test_restart_applies_to_auto(self, tmp_path: Path) -> None:
        assert self.parse(tmp_path, sdk="auto", restart="never").jobs["j"].restart == "never"

    def test_a_gang_needs_sdk_true(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match="a gang needs the SDK"):
            self.parse(tmp_path, sdk="auto", ranks=2)


class TestBeforeTheHello:
    """Until a hello comes, the life is guarded by samples alone, as a guard-only one."""

    def test_it_runs_with_no_hello_past_the_startup_timeout(self, service: Any) -> None:
        s = service({"j": AUTO})
        job = s.job("j")
        job.start(s.system.clock)
        assert job.state == JobState.RUNNING
        for _ in range(30):
            s.turn(0.1)
        assert job.state == JobState.RUNNING and s.proc("j").signals == []

    def test_checkpoint_is_refused_as_no_connected_worker(self, service: Any) -> None:
        s = service({"j": AUTO})
        s.job("j").start(s.system.clock)
        with pytest.raises(ControlError, match="no connected worker"):
            s.call("checkpoint", job="j")

    def test_a_breach_is_sigterm(self, service: Any) -> None:
        s = service({"j": AUTO})
        job = s.job("j")
        job.start(s.system.clock)
        breach(s)
        assert job.state == JobState.STOPPING and s.proc("j").signals == [signal.SIGTERM]

    def test_exit_0_without_a_hello_finishes(self, service: Any) -> None:
        s = service({"j": AUTO})
        job = s.job("j")
        job.start(s.system.clock)
        s.proc("j").code = 0
        s.turn()
        assert job.state == JobState.FINISHED


class TestAfterTheHello:
    """A hello, whenever it comes, makes the life an SDK one: checkpoints, hang detection, batch changes."""

    def test_a_late_hello_makes_checkpoints_possible(self, service: Any) -> None:
        s = service({"j": AUTO})
        job = s.job("j")
        job.start(s.system.clock)
        for _ in range(30):  # 3 s, past startup_timeout
            s.turn(0.1)
        s.hello("j")
        s.call("checkpoint", job="j")
        assert job.state == JobState.RUNNING

    def test_a_breach_asks_for_a_checkpoint_and_the_restart_takes_the_new_batch(self, service: Any) -> None:
        s = service({"j": AUTO})
        job = s.job("j")
        job.start(s.system.clock)
        s.hello("j")
        breach(s)
        assert job.state == JobState.CHECKPOINTING and s.proc("j").signals == []
        s.leave("j")
        s.turn()
        assert len(s.system.procs) == 2 and (job.batch, job.accum) == (4, 2)
        assert job.state == JobState.RUNNING  # the new life, guarded by samples until its own hello

    def test_silence_after_the_hello_is_a_hang(self, service: Any) -> None:
        s = service({"j": AUTO})
        job = s.job("j")
        job.start(s.system.clock)
        s.hello("j")
        for _ in range(15):
            s.turn(0.1)
        assert job.state == JobState.STOPPING and s.proc("j").signals == [signal.SIGTERM]


class TestStatus:
    """Status speaks of samples while the job is guard-only, of steps and batches once it said hello."""

    def test_guard_only_status_has_growth_and_null_step_fields(self, service: Any) -> None:
        s = service({"j": AUTO})
        job = s.job("j")
        job.start(s.system.clock)
        for i in range(12):
            s.proc("j").sampled = (100 + 50 * i) * MiB
            s.turn(0.25)
            job.on_sample(s.system.clock, 8 << 30, 0)
        row = describe(job)
        assert row["guard_only"] is True and row["batch"] is None and row["step"] is None
        assert row["leak_bytes_per_step"] is None and row["steps_per_second"] is None
        assert row["guard"]["growth_bytes_per_second"] == 200 * MiB
        assert row["guard"]["budget_in_seconds"] == pytest.approx((1000 - 650) / 200, abs=0.01)
        assert "guard-only" in status_line(row) and "batch" not in status_line(row)
        assert "guard-only" in top_frame([row], {}) and "200.0/s" in top_frame([row], {})

    def test_after_the_hello_status_has_the_batch(self, service: Any) -> None:
        s = service({"j": AUTO})
        job = s.job("j")
        job.start(s.system.clock)
        s.hello("j")
        row = describe(job)
        assert row["guard_only"] is False and (row["batch"], row["accum"]) == (8, 1) and "guard" not in row
