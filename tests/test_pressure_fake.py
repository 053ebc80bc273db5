"""macOS memory pressure and the system floor, on a fake OS: at critical pressure
(``kern.memorystatus_vm_pressure_level`` 4) the daemon acts as when available memory is under the floor, since
psutil's available memory on macOS (inactive + free) is only a rough figure. The floor itself is tested against a
real memory hog in test_supervise.py::TestSystemFloor; this mirrors it with a fake pressure reading."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.core.states import JobState
from tests.test_lifecycle import Service, no_orphans  # noqa: F401 - the fixture: nothing real is spawned here

pytestmark = pytest.mark.darwin_real("TestPressureLevel::test_pressure_level_reads_and_matches_sysctl")
GiB = 2**30
FLOOR = {"system_floor": "4GiB", "floor_hysteresis": "1GiB"}  # FakeSystem: 16 GiB total, 8 GiB available


def squeeze(s: Service, cause: str) -> None:
    if cause == "available under the floor":
        s.system.available = 3 * GiB
    else:  # critical pressure while psutil still reports plenty available
        s.system.level = 4


def relieve(s: Service, cause: str) -> None:
    if cause == "available under the floor":
        s.system.available = 8 * GiB
    else:
        s.system.level = 1


@pytest.fixture
def running(tmp_path: Path, run_dir: Path) -> Iterator[Service]:
    """A real DaemonService over the fake OS with a floor, its one job running."""
    s = Service(tmp_path, run_dir, {"j": {}}, **FLOOR)
    try:
        s.job("j").start(s.system.clock)
        s.hello("j")
        s.turn()
        assert s.job("j").state == JobState.RUNNING
        yield s
    finally:
        s.close()


@pytest.mark.parametrize("cause", ["available under the floor", "fake critical pressure"])
def test_fake_os_job_checkpoints_waits_for_memory_and_resumes(running: Service, cause: str) -> None:
    s = running
    squeeze(s, cause)
    s.turn()
    job = s.job("j")
    assert job.life is not None and job.life.pending is not None
    assert "floor" in job.life.pending.reason  # asked to checkpoint and exit for the floor
    s.leave("j")  # it checkpointed and left
    s.turn()
    assert job.state == JobState.WAITING_FOR_MEMORY and len(s.system.procs) == 1
    for _ in range(5):
        s.turn()
    assert job.state == JobState.WAITING_FOR_MEMORY and len(s.system.procs) == 1  # stays put meanwhile
    relieve(s, cause)
    s.turn()
    assert job.state == JobState.STARTING and len(s.system.procs) == 2


@pytest.mark.parametrize("level", [None, 1, 2])
def test_fake_pressure_below_critical_leaves_the_job_running(running: Service, level: int | None) -> None:
    s = running
    s.system.level = level
    for _ in range(5):
        s.turn()
    job = s.job("j")
    assert job.state == JobState.RUNNING and job.life is not None and job.life.pending is None
