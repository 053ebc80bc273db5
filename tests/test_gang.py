"""Gangs end to end on loopback: two real ranks on MLX's ring backend, supervised by a real `mlxsupd run`.

Every supervised run trains the same job as an uninterrupted two-rank run started by hand (the reference), so a
gang that stopped, checkpointed and resumed must end with bit-identical weights and optimizer state.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.gangs import (
    TRAIN,
    eval_loss,
    finish,
    free_port_base,
    gang_job,
    history,
    rank_pid,
    reference_run,
    same_weights,
    start,
)

pytestmark = pytest.mark.slow
FINAL = f"ckpt-{TRAIN['steps']:010d}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The final checkpoint of the uninterrupted, unsupervised two-rank run."""
    return reference_run(tmp_path_factory.mktemp("reference")) / FINAL


def run(config_file: Any, tmp_path: Path, spawn: Any, job: dict[str, Any]) -> tuple[dict[str, Any], Path]:
    config = config_file({"j": gang_job(free_port_base(), **job)})
    summary = finish(start(spawn, config, tmp_path / "summary.json"), tmp_path / "summary.json")
    return summary, tmp_path / "state" / "jobs" / "j" / "checkpoints" / FINAL


class TestOneStopStep:
    """A reason to stop on one rank stops every rank at the same step, and nothing is lost."""

    def test_leak_on_rank_1_stops_both_ranks_at_one_step_and_resumes_bitwise(
            self, config_file: Any, tmp_path: Path, spawn: Any, reference: Path) -> None:
        summary, final = run(config_file, tmp_path, spawn, {
            "budget": "400MiB", "train": {"leak_mb_per_step": 10, "fault_rank": 1}})
        assert summary["outcome"] == "finished" and summary["steps_completed"] == TRAIN["steps"]
        # Lives long enough that no recycle also shrinks the batch: a batch change is exact in value, not in bits.
        assert summary["batch_history"] == [[0, 4, 1]]
        assert summary["restarts"] >= 1 and set(summary["restart_reasons"]) <= {"leak", "leak_predicted"}
        assert summary["stop_steps"] and all(len(set(steps)) == 1 for steps in summary["stop_steps"])
        assert all(len(steps) == 2 for steps in summary["stop_steps"])
        ranks = {r["rank"]: r for r in summary["ranks"]}
        assert ranks[1]["max_sampled_bytes"] > ranks[0]["max_sampled_bytes"]  # the leak was on rank 1 only
        assert summary["samples_over_budget"] == 0
        assert same_weights(final, reference)


class TestGangRestart:
    """A rank that dies or stops responding restarts the whole gang from its last checkpoint."""

    def test_sigkill_of_one_rank_restarts_the_gang_and_nothing_is_lost(
            self, config_file: Any, tmp_path: Path, spawn: Any, reference: Path) -> None:
        config = config_file({"j": gang_job(free_port_base(), train={"step_sleep": 0.05})})
        daemon = start(spawn, config, tmp_path / "summary.json")
        os.kill(rank_pid(tmp_path, 1, after_checkpoint=12), signal.SIGKILL)
        summary = finish(daemon, tmp_path / "summary.json")
        assert summary["outcome"] == "finished" and summary["restarts"] == 1
        assert list(summary["restart_reasons"]) == ["rank 1 killed by signal 9"]
        exits = [e for e in history(tmp_path) if e["event"] == "exit"]
        assert exits[0]["code"] == -signal.SIGKILL
        ranks = {e["rank"]: e for e in history(tmp_path) if e["event"] == "rank_exit" and e["life"] == 1}
        assert ranks[1]["signal"] == "SIGKILL" and ranks[1]["expected"] is False  # the failure
        assert ranks[0]["expected"] is True and "rank 1 killed by signal 9" in ranks[0]["cause"]  # its fall-out
        assert same_weights(tmp_path / "state" / "jobs" / "j" / "checkpoints" / FINAL, reference)

    def test_sigstop_of_one_rank_is_a_hang_that_restarts_the_gang(
            self, config_file: Any, tmp_path: Path, spawn: Any, reference: Path) -> None:
        config = config_file({"j": gang_job(free_port_base(), hang_timeout=3.0, train={"step_sleep": 0.05})})
        daemon = start(spawn, config, tmp_path / "summary.json")
        os.kill(rank_pid(tmp_path, 1, after_checkpoint=12), signal.SIGSTOP)
        summary = finish(daemon, tmp_path / "summary.json")
        assert summary["outcome"] == "finished" and summary["restarts"] == 1
        [reason] = summary["restart_reasons"]
        # Both are silent; the shape is named: rank 1 stopped, rank 0 blocked in the gradient all-reduce.
        assert reason.startswith("hung: rank 1 silent ") and "rank 0 waiting in all_sum for " in reason, reason
        events = history(tmp_path)
        kills = [e for e in events if e["event"] == "kill"]
        # One record per process signalled; the blocked rank ignores SIGTERM, the stopped one cannot act on it.
        assert [k["signal"] for k in kills] == ["SIGTERM", "SIGTERM", "SIGKILL", "SIGKILL"]
        assert {k["pid"] for k in kills} == {e["pid"] for e in events if e["event"] == "spawn" and e["life"] == 1}
        exits = [e for e in events if e["event"] == "rank_exit" and e["life"] == 1]
        assert sorted(e["rank"] for e in exits) == [0, 1] and all(e["expected"] for e in exits)
        assert same_weights(tmp_path / "state" / "jobs" / "j" / "checkpoints" / FINAL, reference)


    def test_a_rank_that_never_enters_the_all_reduce_is_named_and_the_gang_restarts(
            self, config_file: Any, tmp_path: Path, spawn: Any, reference: Path) -> None:
        config = config_file({"j": gang_job(free_port_base(), hang_timeout=3.0, train={
            "step_sleep": 0.05, "hang_after_steps": 14, "fault_rank": 1,
            "fault_once_file": str(tmp_path / "hung-once")})})
        summary = finish(start(spawn, config, tmp_path / "summary.json"), tmp_path / "summary.json")
        assert summary["outcome"] == "finished" and summary["restarts"] == 1
        [reason] = summary["restart_reasons"]
        assert reason.startswith("hung: rank 1 silent ") and "rank 0 waiting in all_sum for " in reason, reason
        assert same_weights(tmp_path / "state" / "jobs" / "j" / "checkpoints" / FINAL, reference)


class TestPeak:
    """A peak on one rank shrinks every rank's batch, keeping the global batch."""

    def test_peak_on_rank_1_halves_both_batches_and_the_loss_stays(
            self, config_file: Any, tmp_path: Path, spawn: Any, reference: Path) -> None:
        summary, final = run(config_file, tmp_path, spawn, {
            "budget": "400MiB", "kill": "150%",
            "train": {"peak_mb_per_sample": 100, "peak_until_step": 12, "fault_rank": 1}})
        assert summary["outcome"] == "finished" and summary["restarts"] == 1
        assert [b[1:] for b in summary["batch_history"]] == [[4, 1], [2, 2]]  # 2 ranks x 4 x 1 = 2 x 2 x 2
        decisions = [e for e in history(tmp_path) if e["event"] == "decision" and e.get("diagnosis") == "peak"]
        assert decisions and {d["rank"] for d in decisions} == {1}
        shrunk, unshrunk = eval_loss(final), eval_loss(reference)
        # The same samples in smaller micro-batches: only rounding differs, far below the loss's own noise.
        assert abs(shrunk - unshrunk) < 0.01 * unshrunk, (shrunk, unshrunk)


class TestGangExample:
    """The gang example docs/distributed.md quotes runs supervised as two ranks to the end."""

    def test_readme_quotes_the_example_verbatim(self) -> None:
        root = Path(__file__).resolve().parent.parent
        example = (root / "examples" / "gang_loop.py").read_text()
        assert example.strip() in (root / "docs" / "distributed.md").read_text()

    def test_example_trains_as_two_ranks_with_collective_checkpoints(self, config_file: Any, tmp_path: Path,
                                                                     spawn: Any) -> None:
        root = Path(__file__).resolve().parent.parent
        config = config_file({"j": {"command": [sys.executable, str(root / "examples" / "gang_loop.py")],
                                    "ranks": 2, "budget": "2GiB", "checkpoint_every": 25,
                                    "env": {"PYTHONPATH": str(root)},
                                    "gang": {"port": free_port_base()}}})
        summary = finish(start(spawn, config, tmp_path / "summary.json"), tmp_path / "summary.json")
        assert summary["outcome"] == "finished" and summary["steps_completed"] == 100
        assert summary["final_loss"] < 1.0
        checkpoints = tmp_path / "state" / "jobs" / "j" / "checkpoints"
        assert sorted(p.name for p in checkpoints.glob("ckpt-*"))[-1] == "ckpt-0000000100"
        for rank in (0, 1):  # each rank's own state, at every checkpointed step
            assert (checkpoints / "ranks" / f"rank-{rank}" / "ckpt-0000000100").is_dir()


class TestOperator:
    """Operator requests to one daemon reach every rank of its gang at one step."""

    def test_checkpoint_and_stop_requests_land_at_one_step_on_every_rank(self, config_file: Any, tmp_path: Path,
                                                                          spawn: Any) -> None:
        from tests.test_daemon import Daemon

        job = gang_job(free_port_base(), checkpoint_every=0, autostart=True,
                       train={"steps": 100000, "step_sleep": 0.05})
        daemon = Daemon(spawn, config_file({"j": job}), tmp_path)
        daemon.wait(lambda: sum(r["state"] == "running" for r in daemon.json("status", "j")["jobs"][0]["ranks"]) == 2,
                    60, "both ranks running")
        text = subprocess.run([sys.executable, "-m", "supervisor.cli.mlxsupctl", "-c", str(daemon.config), "status",
                               "j"], capture_output=True, text=True, timeout=30).stdout
        assert "gang: 2 ranks, generation 1" in text and "rank 0" in text and "rank 1" in text
        daemon.json("checkpoint", "j")

        def saved() -> list[dict[str, Any]]:
            return [e for e in daemon.history("j") if e["event"] == "checkpoint"]

        daemon.wait(lambda: len(saved()) == 2, 30, "a checkpoint from each rank")
        assert {e["rank"] for e in saved()} == {0, 1} and len({e["step"] for e in saved()}) == 1
        daemon.json("stop", "j")
        daemon.wait(lambda: daemon.states()["j"] == "STOPPED", 30, "the gang stopped")
        [stop] = [e["steps"] for e in daemon.history("j") if e["event"] == "gang_stop"]
        assert len(set(stop)) == 1 and stop[0] > saved()[0]["step"]
        assert daemon.stop() == 0
