"""End to end: real `mlxsupd run`, real workers, real MLX training, real ZeroMQ, real signals."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from supervisor.daemon.history import read_history
from tests.conftest import SMALL, mlxsupd, run_to_end

pytestmark = pytest.mark.slow


def run_job(config_file: Any, tmp_path: Path, job: dict[str, Any], timeout: float = 240,
            **daemon: Any) -> tuple[int, dict[str, Any], list[dict[str, Any]]]:
    """Run job 'j' to its end; return (exit status, summary, history)."""
    job = {"checkpoint_every": 5, **job, "train": {**SMALL, **job.get("train", {})}}
    path = config_file({"j": job}, **daemon)
    done, summary = run_to_end(path, "j", tmp_path / "summary.json", timeout)
    history = read_history(tmp_path / "state" / "jobs" / "j" / "history.jsonl")
    return done.returncode, summary, history


class TestMemory:
    """Breaches end in checkpoint-and-exit and a restart that fits the budget."""

    @pytest.mark.timeout(420)  # about 20 s alone; a 2-core machine shared with other work can take several times that
    def test_leak_is_recycled_at_the_same_batch_without_crossing_the_budget(self, config_file: Any,
                                                                            tmp_path: Path) -> None:
        code, summary, _ = run_job(config_file, tmp_path, timeout=400, job={
            "budget": "700MiB", "train": {"steps": 400, "leak_mb_per_step": 25}})
        assert code == 0 and summary["outcome"] == "finished"
        assert summary["steps_completed"] == 400
        assert summary["restarts"] >= 2
        assert set(summary["restart_reasons"]) <= {"leak", "leak_predicted"}
        assert summary["batch_history"] == [[0, 8, 1]]
        assert summary["samples_over_budget"] == 0
        assert summary["max_sampled_bytes"] <= summary["budget_bytes"]

    def test_peak_shrinks_the_batch_once_keeping_the_effective_batch(self, config_file: Any,
                                                                      tmp_path: Path) -> None:
        code, summary, history = run_job(config_file, tmp_path, {
            "budget": "900MiB", "kill": "150%", "train": {"steps": 40, "peak_mb_per_sample": 120}})
        assert code == 0 and summary["outcome"] == "finished"
        assert summary["restarts"] == 1
        assert [b[1:] for b in summary["batch_history"]] == [[8, 1], [4, 2]]
        assert any(e["event"] == "decision" and e.get("diagnosis") == "peak" for e in history)

    def test_batch_regrows_to_the_configured_one_once_the_peak_is_gone(self, config_file: Any,
                                                                        tmp_path: Path) -> None:
        code, summary, _ = run_job(config_file, tmp_path, {
            "budget": "900MiB", "kill": "150%", "regrow_after_steps": 10,
            "train": {"steps": 80, "peak_mb_per_sample": 120, "peak_until_step": 20}})
        assert code == 0 and summary["outcome"] == "finished"
        batches = [b[1] for b in summary["batch_history"]]
        assert batches[0] == 8 and 4 in batches and batches[-1] == 8
        assert summary["restart_reasons"].get("regrow") == 1


class TestFailures:
    """Crashes back off, hangs are killed, and no progress ends in FATAL."""

    def test_crash_is_restarted_after_a_backoff(self, config_file: Any, tmp_path: Path) -> None:
        code, summary, history = run_job(config_file, tmp_path, {
            "checkpoint_every": 3, "backoff_initial": 0.5,
            "train": {"steps": 20, "crash_after_steps": 7, "fault_once_file": str(tmp_path / "crashed")}})
        assert code == 0 and summary["outcome"] == "finished" and summary["steps_completed"] == 20
        assert summary["restart_reasons"] == {"exit 3": 1}
        states = [e["new"] for e in history if e["event"] == "state"]
        assert "BACKOFF" in states
        backoff = next(e for e in history if e["event"] == "state" and e["new"] == "BACKOFF")
        assert backoff["delay"] == 0.5

    def test_hung_worker_is_killed_and_restarted(self, config_file: Any, tmp_path: Path) -> None:
        code, summary, history = run_job(config_file, tmp_path, {
            "hang_timeout": 2.0, "kill_grace": 1.0, "backoff_initial": 0.2, "checkpoint_every": 2,
            "train": {"steps": 20, "hang_after_steps": 5, "fault_once_file": str(tmp_path / "hung")}})
        assert code == 0 and summary["outcome"] == "finished"
        assert summary["restarts"] == 1
        assert any(e["event"] == "kill" and "hung" in e["reason"] for e in history)

    def test_fatal_after_attempts_without_progress(self, config_file: Any, tmp_path: Path) -> None:
        code, summary, history = run_job(config_file, tmp_path, {
            "max_attempts_without_progress": 3, "backoff_initial": 0.05,
            "train": {"steps": 20, "crash_after_steps": 0}})
        assert code == 1 and summary["outcome"] == "fatal"
        assert summary["restarts"] == 2
        assert [e["new"] for e in history if e["event"] == "state"][-1] == "FATAL"


class TestOrphan:
    """A worker whose daemon vanished checkpoints and exits by itself."""

    def test_worker_exits_with_a_checkpoint_after_daemon_sigkill(self, config_file: Any, tmp_path: Path,
                                                                 spawn: Any) -> None:
        path = config_file({"j": {"checkpoint_every": 0, "train": {**SMALL, "steps": 100000}}})
        daemon = spawn(mlxsupd("run", "-c", str(path), "j"), stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        history_path = tmp_path / "state" / "jobs" / "j" / "history.jsonl"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if any(e.get("new") == "RUNNING" for e in read_history(history_path)):
                break
            time.sleep(0.1)
        time.sleep(1.0)
        workers = psutil.Process(daemon.pid).children()
        assert len(workers) == 1
        daemon.kill()
        daemon.wait(timeout=10)
        killed_at = time.monotonic()
        gone, _ = psutil.wait_procs(workers, timeout=10)
        assert gone, "worker outlived its daemon"
        assert time.monotonic() - killed_at < 5.0
        checkpoints = list((tmp_path / "state" / "jobs" / "j" / "checkpoints").glob("ckpt-*"))
        assert checkpoints, "the orphaned worker did not checkpoint"


class TestSdkExample:
    """The example loop docs/sdk.md quotes runs supervised end to end."""

    def test_readme_quotes_the_example_verbatim(self) -> None:
        root = Path(__file__).resolve().parent.parent
        example = (root / "examples" / "sdk_loop.py").read_text()
        assert example.strip() in (root / "docs" / "sdk.md").read_text()

    def test_example_loop_is_supervised_to_the_end(self, config_file: Any, tmp_path: Path) -> None:
        import sys

        root = Path(__file__).resolve().parent.parent
        path = config_file({"j": {"command": [sys.executable, str(root / "examples" / "sdk_loop.py")],
                                  "checkpoint_every": 50, "env": {"PYTHONPATH": str(root)}}})
        done, summary = run_to_end(path, "j", tmp_path / "s.json", timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        assert summary["outcome"] == "finished" and summary["steps_completed"] == 200
        assert summary["final_loss"] < 1.0
        assert (tmp_path / "state" / "jobs" / "j" / "checkpoints" / "ckpt-0000000200").is_dir()


class TestHeldTelemetry:
    """A fast loop far from its budget: the SDK holds its steps and sends them as ``steps`` frames; the daemon
    counts and records every step all the same."""

    def test_every_step_is_recorded_once_and_most_came_in_steps_frames(self, config_file: Any,
                                                                      tmp_path: Path) -> None:
        import sys

        from supervisor.daemon.recorder import read_records

        root = Path(__file__).resolve().parent.parent
        path = config_file({"j": {"command": [sys.executable, str(root / "examples" / "sdk_loop.py"), "3000"],
                                  "checkpoint_every": 0, "env": {"PYTHONPATH": str(root)}}},
                           heartbeat_interval=0.2)
        done, summary = run_to_end(path, "j", tmp_path / "s.json", timeout=180)
        assert done.returncode == 0 and summary["steps_completed"] == 3000, done.stderr[-2000:]
        telemetry = tmp_path / "state" / "jobs" / "j" / "telemetry.jsonl"
        lines = [json.loads(line) for line in telemetry.read_text().splitlines()]
        batched = sum(len(r["step"]) for r in lines if r["k"] == "steps")
        assert batched > 1500, f"only {batched} of 3000 steps came in steps frames"
        steps = [r["step"] for r in read_records(telemetry) if r["k"] == "step"]
        assert steps == list(range(1, 3001))


class TestSystemFloor:
    """A co-resident app that grows pushes available memory under the floor: the job checkpoints and waits."""

    def test_job_waits_for_a_memory_hog_and_resumes(self, config_file: Any, tmp_path: Path, spawn: Any) -> None:
        import sys

        available = psutil.virtual_memory().available
        floor = available - 2 * 2**30  # a 3 GiB hog takes us 1 GiB under it
        path = config_file({"j": {"checkpoint_every": 0, "train": {**SMALL, "steps": 100000}}},
                           system_floor=str(floor), floor_hysteresis="256MiB")
        daemon = spawn(mlxsupd("run", "-c", str(path), "j", "--summary", str(tmp_path / "s.json")),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        history_path = tmp_path / "state" / "jobs" / "j" / "history.jsonl"

        def states() -> list[str]:
            return [e["new"] for e in read_history(history_path) if e["event"] == "state"]

        def wait(predicate: Any, what: str, timeout: float = 60) -> None:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and not predicate():
                assert daemon.poll() is None, "daemon exited"
                time.sleep(0.1)
            assert predicate(), what

        wait(lambda: "RUNNING" in states(), "job running")
        time.sleep(1)
        hog_code = ("import sys, time\nb = bytearray(3 * 2**30)\nfor i in range(0, len(b), 4096): b[i] = 1\n"
                    "print('ready', flush=True)\ntime.sleep(30)\n")
        hog = spawn([sys.executable, "-c", hog_code], stdout=subprocess.PIPE)
        assert hog.stdout is not None and hog.stdout.readline().strip() == b"ready"
        wait(lambda: "WAITING_FOR_MEMORY" in states(), "job waiting for memory")
        waiting_exit = [e for e in read_history(history_path) if e["event"] == "exit"][-1]
        assert waiting_exit["code"] == 75 and waiting_exit["checkpoint"] == waiting_exit["step"]  # nothing lost
        time.sleep(1)
        assert states()[-1] == "WAITING_FOR_MEMORY"  # stays put while the hog holds the memory
        hog.kill()
        hog.wait(timeout=10)
        wait(lambda: states()[-1] == "RUNNING" and states().count("RUNNING") >= 2, "job resumed")
        spawn_event = [e for e in read_history(history_path) if e["event"] == "spawn"][-1]
        assert spawn_event["from_checkpoint"] == waiting_exit["checkpoint"]
        daemon.terminate()
        assert daemon.wait(timeout=60) in (0, 1)
