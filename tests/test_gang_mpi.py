"""Gangs on MLX's MPI backend (Debian's Open MPI), supervised by a real `mlxsupd run`.

The daemon starts both ranks itself, each in its own process group; a per-generation `mpirun` over placeholders
only publishes each MPI rank's environment (supervisor/daemon/backends.py). The runs train the same job as the
ring reference of tests/test_gang.py: two ranks averaging gradients over MPI must end bit for bit where two
ranks averaging over the ring end (a sum of two floats does not depend on its order).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.gangs import (
    TRAIN,
    finish,
    free_port_base,
    gang_job,
    history,
    rank_pid,
    reference_run,
    same_weights,
    start,
    wait_for,
)


def _mpi_missing() -> str:
    if shutil.which("mpirun") is None:
        return "Open MPI is absent (no mpirun on PATH): bash tests/sysdeps.sh mpi"
    try:
        ctypes.CDLL("libmpi.so")  # what MLX dlopens
    except OSError:
        return "libmpi.so, which MLX dlopens, is absent (Debian: libopenmpi-dev): bash tests/sysdeps.sh mpi"
    return ""


pytestmark = [pytest.mark.slow, pytest.mark.linux_only("reads /proc/PID/maps"),
              pytest.mark.skipif(bool(_mpi_missing()), reason=_mpi_missing() or "-")]
FINAL = f"ckpt-{TRAIN['steps']:010d}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The final checkpoint of the uninterrupted, unsupervised two-rank run (ring backend)."""
    return reference_run(tmp_path_factory.mktemp("reference")) / FINAL


def mpi_job(**job: Any) -> dict[str, Any]:
    return gang_job(free_port_base(), backend="mpi", **job)


def rendezvous_left(run_dir: Path) -> list[str]:
    """Command lines of processes still running a rendezvous of this test (mpirun or a placeholder)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        line = " ".join(proc.info["cmdline"] or [])
        if "mlxsup-mpi-placeholder" in line and str(run_dir) in line:
            found.append(line)
    return found


def wait_gone(run_dir: Path, timeout: float = 10) -> list[str]:
    deadline = time.monotonic() + timeout
    while (left := rendezvous_left(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


class TestMpiGang:
    """An MPI gang runs the built-in job under the daemon, rank by rank in sight."""

    def test_two_mpi_ranks_run_to_the_end_as_the_daemons_own_children(
            self, config_file: Any, tmp_path: Path, run_dir: Path, spawn: Any, reference: Path) -> None:
        config = config_file({"j": mpi_job(train={"step_sleep": 0.05})})
        daemon = start(spawn, config, tmp_path / "summary.json")
        pids = [rank_pid(tmp_path, rank, after_checkpoint=6) for rank in (0, 1)]
        for pid in pids:
            process = psutil.Process(pid)
            assert process.ppid() == daemon.pid  # started by the daemon, not by mpirun
            assert os.getpgid(pid) == pid  # in a process group of its own
            assert "libmpi.so" in Path(f"/proc/{pid}/maps").read_text()  # MLX dlopened Open MPI
        samples = [e for e in history(tmp_path) if e["event"] == "spawn"]
        assert {e["rank"] for e in samples} == {0, 1}
        status = subprocess.run([sys.executable, "-m", "supervisor.cli.mlxsupctl", "-c", str(config), "status", "j"],
                                capture_output=True, text=True, timeout=30).stdout
        assert "gang: 2 ranks, generation 1" in status and "backend mpi" in status
        summary = finish(daemon, tmp_path / "summary.json")
        assert summary["outcome"] == "finished" and summary["steps_completed"] == TRAIN["steps"]
        assert summary["restarts"] == 0
        ranks = {r["rank"]: r for r in summary["ranks"]}
        assert all(ranks[r]["max_sampled_bytes"] > 0 for r in (0, 1))  # each rank sampled on its own
        assert same_weights(tmp_path / "state" / "jobs" / "j" / "checkpoints" / FINAL, reference)
        assert wait_gone(run_dir) == []

    def test_a_leak_stop_on_rank_1_restarts_the_mpi_gang_and_it_resumes_bitwise(
            self, config_file: Any, tmp_path: Path, run_dir: Path, spawn: Any, reference: Path) -> None:
        config = config_file({"j": mpi_job(budget="400MiB", train={"leak_mb_per_step": 10, "fault_rank": 1})})
        summary = finish(start(spawn, config, tmp_path / "summary.json"), tmp_path / "summary.json")
        assert summary["outcome"] == "finished" and summary["steps_completed"] == TRAIN["steps"]
        assert summary["restarts"] >= 1 and set(summary["restart_reasons"]) <= {"leak", "leak_predicted"}
        assert summary["stop_steps"] and all(len(set(steps)) == 1 for steps in summary["stop_steps"])
        assert summary["batch_history"] == [[0, 4, 1]]
        assert summary["samples_over_budget"] == 0
        generations = {e["life"] for e in history(tmp_path) if e["event"] == "spawn"}
        assert len(generations) == summary["restarts"] + 1  # one rendezvous each: every generation is a new world
        assert same_weights(tmp_path / "state" / "jobs" / "j" / "checkpoints" / FINAL, reference)
        assert wait_gone(run_dir) == []

    def test_a_sigkilled_mpi_rank_restarts_the_gang_from_its_checkpoint(
            self, config_file: Any, tmp_path: Path, run_dir: Path, spawn: Any, reference: Path) -> None:
        config = config_file({"j": mpi_job(hang_timeout=5.0, train={"step_sleep": 0.05})})
        daemon = start(spawn, config, tmp_path / "summary.json")
        os.kill(rank_pid(tmp_path, 1, after_checkpoint=12), signal.SIGKILL)
        summary = finish(daemon, tmp_path / "summary.json")
        assert summary["outcome"] == "finished" and summary["restarts"] == 1
        ranks = {e["rank"]: e for e in history(tmp_path) if e["event"] == "rank_exit" and e["life"] == 1}
        assert ranks[1]["signal"] == "SIGKILL" and ranks[1]["expected"] is False
        assert ranks[0]["expected"] is True  # the survivor's end is the fall-out, not a second failure
        assert same_weights(tmp_path / "state" / "jobs" / "j" / "checkpoints" / FINAL, reference)
        assert wait_gone(run_dir) == []


class TestMpiScript:
    """An SDK script that calls mx.distributed.init() itself, before its Session exists, joins the MPI world."""

    def test_the_readme_gang_loop_runs_as_an_mpi_gang(self, config_file: Any, tmp_path: Path, run_dir: Path,
                                                     spawn: Any) -> None:
        root = Path(__file__).resolve().parent.parent
        config = config_file({"j": {"command": [sys.executable, str(root / "examples" / "gang_loop.py")],
                                    "ranks": 2, "backend": "mpi", "budget": "2GiB", "checkpoint_every": 25,
                                    "env": {"PYTHONPATH": str(root)}, "gang": {"port": free_port_base()}}})
        summary = finish(start(spawn, config, tmp_path / "summary.json"), tmp_path / "summary.json")
        assert summary["outcome"] == "finished" and summary["steps_completed"] == 100
        assert summary["final_loss"] < 1.0
        for rank in (0, 1):
            assert "[mpi]" not in (tmp_path / "state" / "logs" / "jobs" / "j" / f"rank-{rank}" /
                                   "stderr.log").read_text()
        assert wait_gone(run_dir) == []


class TestMpiOrphans:
    """With the daemon gone, the MPI ranks checkpoint by themselves (over MPI, so the rendezvous waits for them)."""

    def test_orphaned_mpi_ranks_checkpoint_together_and_the_rendezvous_leaves_after_them(
            self, config_file: Any, tmp_path: Path, run_dir: Path, spawn: Any) -> None:
        config = config_file({"j": mpi_job(checkpoint_every=0, train={"steps": 100000, "step_sleep": 0.5})})
        daemon = start(spawn, config, tmp_path / "summary.json")

        def hellos() -> list[int]:
            return [e["pid"] for e in history(tmp_path) if e["event"] == "hello"]

        pids = wait_for(lambda: len(hellos()) == 2 and hellos(), "both ranks' hello")
        time.sleep(3)  # a few steps (the ranks see the daemon gone at a step boundary, 0.5 s later at most: long
        # before the watchdog, half an orphan timeout after, would end them mid-step without a checkpoint)
        daemon.kill()
        daemon.wait(timeout=10)
        wait_for(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                                 for p in pids), "the orphaned ranks to leave", timeout=60)
        checkpoints = tmp_path / "state" / "jobs" / "j" / "checkpoints"
        [main] = [p.name for p in checkpoints.glob("ckpt-*")]  # the orphans' collective checkpoint
        for rank in (0, 1):
            assert [p.name for p in (checkpoints / "ranks" / f"rank-{rank}").glob("ckpt-*")] == [main]
        assert wait_gone(run_dir) == []


class TestMpiHang:
    """A stopped MPI rank is a gang hang, named by its shape, and the gang restarts from its checkpoint."""

    def test_sigstop_of_an_mpi_rank_is_a_hang_with_the_other_waiting_in_all_sum(
            self, config_file: Any, tmp_path: Path, run_dir: Path, spawn: Any, reference: Path) -> None:
        config = config_file({"j": mpi_job(hang_timeout=3.0, train={"step_sleep": 0.05})})
        daemon = start(spawn, config, tmp_path / "summary.json")
        os.kill(rank_pid(tmp_path, 1, after_checkpoint=12), signal.SIGSTOP)
        summary = finish(daemon, tmp_path / "summary.json")
        assert summary["outcome"] == "finished" and summary["restarts"] == 1
        [reason] = summary["restart_reasons"]
        assert reason.startswith("hung: rank 1 silent ") and "rank 0 waiting in all_sum for " in reason, reason
        assert same_weights(tmp_path / "state" / "jobs" / "j" / "checkpoints" / FINAL, reference)
        assert wait_gone(run_dir) == []
