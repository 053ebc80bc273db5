"""`mlxsupd run [OPTIONS] -- CMD` end to end, as a newcomer runs it: the installed console scripts, a working
directory outside the source tree, no config file anywhere (HOME and XDG point into the test's directory)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from protocol.checkpoints import latest_step
from supervisor.daemon.history import read_history
from tests.conftest import ROOT

BIN = Path(sys.executable).parent
WORKERS = ROOT / "tests" / "workers"


class Newcomer:
    """A user's directory with their scripts copied in, and the environment of a fresh account."""

    def __init__(self, tmp_path: Path, run_dir: Path, spawn: Any) -> None:
        self.work = tmp_path / "work"
        self.work.mkdir()
        for script in ("sdk_leak.py", "plain_leak.py"):
            shutil.copy(WORKERS / script, self.work / script)
        home = tmp_path / "home"
        self.env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
                    "XDG_STATE_HOME": str(home / ".local" / "state"), "XDG_RUNTIME_DIR": str(run_dir),
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "MLXSUP_TEST_MARK": str(tmp_path),
                    "HF_HUB_OFFLINE": "1"}
        self.env.pop("PYTHONPATH", None)
        self.state = home / ".local" / "state" / "mlx-supervisor"
        self.spawn = spawn

    def run(self, *argv: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "mlxsupd"), "run", *argv], cwd=self.work, env={**self.env, **env},
                              capture_output=True, text=True, timeout=timeout)

    def start(self, *argv: str) -> subprocess.Popen[str]:
        popen: subprocess.Popen[str] = self.spawn([str(BIN / "mlxsupd"), "run", *argv], env=self.env,
                                                  cwd=self.work, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                  text=True)
        return popen

    def ctl(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "mlxsupctl"), *argv], cwd=self.work, env=self.env, capture_output=True,
                              text=True, timeout=30)

    def wait_running(self, name: str, proc: subprocess.Popen[str], steps: int = 1) -> dict[str, Any]:
        """`mlxsupctl status` (no options: no config, the default run dir) until the job has done ``steps``."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            done = self.ctl("status", name, "--json")
            if done.returncode == 0:
                (row,) = json.loads(done.stdout)["jobs"]
                if row["state"] == "RUNNING" and (row["step"] or 0) >= steps:  # None until the hello
                    return dict(row)
            time.sleep(0.2)
        raise AssertionError("the job never ran")

    def history(self, name: str) -> list[dict[str, Any]]:
        return read_history(self.state / "jobs" / name / "history.jsonl")


@pytest.fixture
def newcomer(tmp_path: Path, run_dir: Path, spawn: Callable[..., Any]) -> Newcomer:
    return Newcomer(tmp_path, run_dir, spawn)


def summary_of(done: subprocess.CompletedProcess[str] | tuple[str, str]) -> dict[str, Any]:
    stdout = done.stdout if isinstance(done, subprocess.CompletedProcess) else done[0]
    return dict(json.loads(stdout))


@pytest.mark.slow
class TestOneLine:
    """The one-line form on the user's own scripts."""

    def test_a_leaking_sdk_script_finishes_its_target(self, newcomer: Newcomer) -> None:
        done = newcomer.run("--budget", "400MiB", "--summary", "out.json", "--plot", "memory.png", "--",
                            "python", "sdk_leak.py", "300", "5")
        assert done.returncode == 0, done.stderr[-3000:]
        summary = summary_of(done)
        assert summary == json.loads((newcomer.work / "out.json").read_text())  # stdout and --summary: one JSON
        assert summary["outcome"] == "finished" and summary["steps_completed"] == 300
        assert summary["restarts"] >= 1 and set(summary["restart_reasons"]) <= {"leak", "leak_predicted"}
        assert summary["samples_over_budget"] == 0 and summary["kind"] == "sdk"
        assert summary["history_path"] == str(newcomer.state / "jobs" / "sdk_leak" / "history.jsonl")
        plot = newcomer.work / "memory.png"
        assert plot.stat().st_size > 0 and summary["plot_path"] == str(plot)
        assert "mlxsupd: sdk_leak finished" in done.stderr and "command: last exit code 0" in done.stderr

    def test_an_unmodified_leaking_script_is_stopped_per_policy(self, newcomer: Newcomer) -> None:
        done = newcomer.run("--budget", "300MiB", "--max-attempts", "2", "--", "python", "plain_leak.py", "200",
                            "20")
        assert done.returncode == 1, done.stderr[-3000:]
        summary = summary_of(done)
        assert summary["outcome"] == "fatal" and summary["kind"] == "guard-only" and summary["restarts"] == 1
        # sdk = "auto" and no hello: guard-only, diagnosed from its samples, with no batch or checkpoint anywhere.
        assert summary["restart_reasons"] == {"leak": 1} and summary["guard_only"] is True
        assert summary["batch_history"] == [] and summary["steps_completed"] is None
        history = newcomer.history("plain_leak")
        assert not any({"batch", "accum", "checkpoint", "next_batch"} & set(e) for e in history)
        kills = [e["signal"] for e in history if e["event"] == "kill"]
        assert kills and set(kills) <= {"SIGTERM", "SIGKILL"}
        assert summary["last_exit_code"] in (-signal.SIGTERM, -signal.SIGKILL)
        assert "started over from scratch once; with the SDK it resumes from a checkpoint" in done.stderr
        assert "leak: " in done.stderr and "(footprint +" in done.stderr and "/second" in done.stderr

    def test_max_steps_is_a_short_measuring_run(self, newcomer: Newcomer) -> None:
        done = newcomer.run("--budget", "1GiB", "--max-steps", "20", "--", "python", "sdk_leak.py", "100000", "0")
        assert done.returncode == 0, done.stderr[-3000:]
        summary = summary_of(done)
        assert summary["stopped_at_max_steps"] and summary["steps_completed"] >= 20
        assert (latest_step(Path(summary["checkpoint_dir"])) or 0) >= 20
        assert "stopped at --max-steps 20" in done.stderr


@pytest.mark.slow
class TestWhileItRuns:
    """mlxsupctl reaches a foreground run; Ctrl-C ends it cleanly with the report."""

    def test_status_answers_and_stop_ends_the_run(self, newcomer: Newcomer) -> None:
        proc = newcomer.start("--budget", "1GiB", "--", "python", "sdk_leak.py", "100000", "0", "--seconds", "0.01")
        row = newcomer.wait_running("sdk_leak", proc)
        assert row["budget_bytes"] == 1 << 30 and row["pid"]
        endpoint = f"ipc://{newcomer.env['XDG_RUNTIME_DIR']}/mlxsup/control.sock"
        top = newcomer.ctl("top", "--once")
        assert top.returncode == 0 and "sdk_leak" in top.stdout and "RUNNING" in top.stdout
        plot = newcomer.ctl("plot", "sdk_leak", "-o", "live.png")  # no config: the daemon says where files are
        assert plot.returncode == 0, plot.stderr
        assert (newcomer.work / "live.png").stat().st_size > 0
        stop = newcomer.ctl("-s", endpoint, "stop", "sdk_leak")
        assert stop.returncode == 0, stop.stderr
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 1 and "mlxsupd: sdk_leak stopped" in stderr
        assert f"mlxsupctl -s {endpoint} status" in stderr  # the first line says how to reach it

    def test_ctrl_c_checkpoints_an_sdk_worker_and_prints_the_report(self, newcomer: Newcomer) -> None:
        proc = newcomer.start("--budget", "1GiB", "--", "python", "sdk_leak.py", "100000", "0", "--seconds", "0.01")
        row = newcomer.wait_running("sdk_leak", proc, steps=5)
        os.kill(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
        summary = summary_of((stdout, stderr))
        assert proc.returncode == 1 and summary["outcome"] == "stopped"
        assert summary["last_exit_code"] == 75  # checkpointed and exited, as asked
        assert (latest_step(Path(summary["checkpoint_dir"])) or 0) >= row["step"]
        assert "mlxsupd: sdk_leak stopped" in stderr
        _gone(row["pid"])

    def test_ctrl_c_stops_a_guard_only_command(self, newcomer: Newcomer) -> None:
        proc = newcomer.start("--budget", "1GiB", "--", "python", "plain_leak.py", "100000", "0", "--seconds", "0.05")
        deadline = time.monotonic() + 30
        pid = None
        while pid is None and time.monotonic() < deadline:
            done = newcomer.ctl("status", "plain_leak", "--json")
            pid = json.loads(done.stdout)["jobs"][0]["pid"] if done.returncode == 0 else None
            time.sleep(0.2)
        assert pid, "the command never started"
        os.kill(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
        summary = summary_of((stdout, stderr))
        assert proc.returncode == 1 and summary["outcome"] == "stopped" and summary["kind"] == "guard-only"
        assert "lost its progress when stopped" in stderr
        _gone(pid)


def _gone(pid: int) -> None:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return
    raise AssertionError(f"worker {pid} is still there")


@pytest.mark.slow
class TestMlxLmPrefixed:
    """An mlx-lm command, prefixed, resumes exactly and its adapters load in mlx-lm."""

    def test_mlx_lm_lora_under_a_leak_finishes_and_its_adapters_load(self, newcomer: Newcomer,
                                                                     tmp_path: Path) -> None:
        pytest.importorskip("mlx_lm")
        from tests._mlx_lm import build_tiny, offline_env

        model, data = build_tiny(tmp_path / "tiny")
        done = newcomer.run("--budget", "600MiB", "--", "mlx_lm.lora", "--model", str(model), "--train", "--data",
                            str(data), "--iters", "20", "--num-layers", "4", "--learning-rate", "1e-4",
                            "--val-batches", "2", "--steps-per-eval", "10", "--save-every", "10",
                            "--adapter-path", "adapters", timeout=300, MLXSUP_INJECT_LEAK_MB_PER_STEP="25")
        assert done.returncode == 0, done.stderr[-3000:]
        summary = summary_of(done)
        assert summary["outcome"] == "finished" and summary["steps_completed"] == 20 and summary["kind"] == "mlx-lm"
        assert summary["restarts"] >= 1 and set(summary["restart_reasons"]) <= {"leak", "leak_predicted"}
        print(f"restarts {summary['restarts']} in {summary['wall_seconds']} s")  # for the record
        from mlx_lm import load

        with offline_env():
            adapted, _ = load(str(model), adapter_path=str(newcomer.work / "adapters"))
        assert adapted is not None
