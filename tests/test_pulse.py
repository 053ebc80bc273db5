"""The session's pulse thread: keepalives while busy, and the orphan watchdog that acts mid-step."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from supervisor.daemon.history import read_history
from tests.conftest import ROOT, mlxsupd
from worker.pulse import Pulse

SLOW = str(ROOT / "tests" / "workers" / "slow.py")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def pulse(clock: Clock, heard: list[float], exits: list[int], parent: int | None = None,
          beats: list[float] | None = None) -> Pulse:
    sent = beats if beats is not None else []
    return Pulse(threading.Lock(), lambda: sent.append(clock.now), lambda: None, lambda: heard[0], 4.0, 75,
                 parent=parent, exit=exits.append, clock=clock)


class TestWatchdogWithFakeClock:
    """The thread's decisions, one look at a time (the real thread only calls check() every 0.25 s)."""

    def test_a_lost_daemon_gets_half_the_orphan_timeout_then_the_process_ends(self) -> None:
        clock, exits = Clock(), []
        p = pulse(clock, [clock.now], exits, parent=os.getppid() + 100_000)  # as if re-parented
        p.check()
        clock.now += 1.9
        p.check()
        assert exits == [] and p.orphan_reason() == "daemon_lost"
        clock.now += 0.2
        p.check()
        assert exits == [75]

    def test_a_silent_daemon_is_an_orphan_after_the_timeout(self) -> None:
        clock, exits, heard = Clock(), [], [1000.0]
        p = pulse(clock, heard, exits)
        clock.now += 3.9
        p.check()
        assert p.orphan_reason() == "" and exits == []
        clock.now += 0.2
        p.check()
        assert p.orphan_reason() == "daemon_silent" and exits == []
        heard[0] = clock.now  # a heartbeat arrives: no longer an orphan
        clock.now += 2.5
        p.check()
        assert exits == []

    def test_a_worker_checkpointing_on_its_way_out_gets_more_time(self) -> None:
        clock, exits = Clock(), []
        p = pulse(clock, [clock.now], exits, parent=os.getppid() + 100_000)
        p.leaving = True
        p.check()
        clock.now += 5.0
        p.check()
        assert exits == []
        clock.now += 1.1
        p.check()
        assert exits == [75]

    def test_busy_sends_a_heartbeat_every_second(self) -> None:
        clock, exits, beats = Clock(), [], []
        p = pulse(clock, [clock.now], exits, beats=beats)
        with p.busy("validation"):
            for _ in range(12):
                clock.now += 0.25
                p.check()
        clock.now += 5
        p.check()
        assert beats == [1000.0, 1001.0, 1002.0, 1003.0]


def run(config_file: Any, tmp_path: Path, command: list[str], timeout: float = 120,
        **job: Any) -> tuple[int, list[dict[str, Any]]]:
    path = config_file({"j": {"command": command, "checkpoint_every": 1, **job}})
    done = subprocess.run(mlxsupd("run", "-c", str(path), "j", "--log-format", "json"), capture_output=True,
                          text=True, timeout=timeout)
    return done.returncode, read_history(tmp_path / "state" / "jobs" / "j" / "history.jsonl")


@pytest.mark.slow
class TestKeepalive:
    """A long evaluation inside session.busy() is not a hang; the same pause outside it is."""

    @pytest.mark.parametrize(("argv", "timeout"), [
        pytest.param(["3", "0", "--busy", "5"], {"hang_timeout": 2.0}, id="evaluation_longer_than_hang_timeout"),
        pytest.param(["2", "0", "--load", "6"], {"startup_timeout": 3.0},
                     id="model_load_before_the_hello_longer_than_startup_timeout"),
    ])
    def test_a_pause_inside_busy_is_not_killed(self, config_file: Any, tmp_path: Path, argv: list[str],
                                               timeout: dict[str, float]) -> None:
        code, history = run(config_file, tmp_path, [sys.executable, SLOW, *argv], **timeout)
        assert code == 0
        assert not [e for e in history if e["event"] == "kill"]

    def test_the_same_pause_without_busy_is_killed_as_hung(self, config_file: Any, tmp_path: Path) -> None:
        _, history = run(config_file, tmp_path, [sys.executable, SLOW, "3", "0", "--idle", "5"],
                         hang_timeout=2.0, backoff_initial=0.2, max_attempts_without_progress=1)  # one kill will do
        kills = [e for e in history if e["event"] == "kill"]
        assert kills and "hung" in kills[0]["reason"]


@pytest.mark.slow
class TestOrphanWatchdog:
    """A worker whose daemon was SIGKILLed mid-step ends within orphan_timeout, not at its next step."""

    def test_orphan_with_a_60_second_step_leaves_within_the_orphan_timeout(self, config_file: Any,
                                                                            spawn: Any, tmp_path: Path) -> None:
        path = config_file({"j": {"command": [sys.executable, SLOW, "3", "60"], "hang_timeout": 120.0}},
                           heartbeat_interval=0.5)  # orphan_timeout = max(3, 5 x 0.5) = 3 s
        daemon = spawn(mlxsupd("run", "-c", str(path), "j", "--log-format", "json"),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        worker = None
        while worker is None and time.monotonic() < deadline:
            children = psutil.Process(daemon.pid).children()
            worker = children[0] if children else None
            time.sleep(0.1)
        assert worker is not None, "the worker never started"
        time.sleep(3.0)  # connected, heartbeats flowing, deep inside its first 60-second step
        os.kill(daemon.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        try:
            worker.wait(timeout=10)
        except psutil.TimeoutExpired:
            pytest.fail("the orphaned worker was still running 10 s after its daemon died")
        # It left because the watchdog saw its daemon gone (after orphan_timeout / 2 of grace: about 1.75 s), not at
        # the end of its 60-second step. The bound is orphan_timeout plus room for a scheduling stall of this shared
        # VM (one fresh-clone run took 3.62 s), still far from the 57 s a step-boundary check would take.
        assert time.monotonic() - killed_at < 3.0 + 2.0
        stderr = (tmp_path / "state" / "logs" / "jobs" / "j" / "stderr.log").read_text()
        assert "watchdog: daemon_lost; leaving mid-step" in stderr
