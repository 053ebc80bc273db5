"""End to end with standbys: real `mlxsupd run`, real built-in workers (one of them waiting as the next), real
MLX training, real checkpoints. The run with standbys is compared with the same run without, bitwise."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
import psutil
import pytest

from supervisor.daemon.history import read_history
from tests.conftest import SMALL, mlxsupd, run_to_end
from worker.checkpoint import load_latest

pytestmark = pytest.mark.slow
MiB = 2**20
# A waiting standby of the built-in job holds Python, MLX, ZeroMQ and the training text, never the model
# (measured here: 35 MiB of RSS in tests/test_standby_worker.py, 40-43 MiB as the daemon samples its group).
STANDBY_BOUND = 64 * MiB
LEAKY = {"budget": "600MiB", "checkpoint_every": 10,
         "train": {**SMALL, "steps": 120, "leak_mb_per_step": 20, "seed": 3}}


def run(config_file: Any, tmp_path: Path, standby: str) -> tuple[dict[str, Any], list[dict[str, Any]], Path]:
    job = {**LEAKY, "standby": standby}
    path = config_file({"j": job}, state_dir=str(tmp_path / standby))
    done, summary = run_to_end(path, "j", tmp_path / f"summary-{standby}.json", timeout=400)
    assert done.returncode == 0 and summary["outcome"] == "finished", done.stderr[-3000:]
    history = read_history(tmp_path / standby / "jobs" / "j" / "history.jsonl")
    return summary, history, Path(summary["checkpoint_dir"])


def weights(checkpoint_dir: Path) -> dict[str, mx.array]:
    loaded = load_latest(checkpoint_dir)
    assert loaded is not None and loaded.step == LEAKY["train"]["steps"]  # type: ignore[index]
    return {**loaded.model, **{f"opt.{k}": v for k, v in loaded.optimizer.items()}}


class TestStandby:
    """Recycles of a leaking built-in job go to a waiting standby; the result is the one without standbys."""

    @pytest.mark.timeout(900)
    def test_recycles_use_the_standby_and_resume_stays_bitwise(self, config_file: Any, tmp_path: Path) -> None:
        on, history, on_dir = run(config_file, tmp_path, "auto")
        off, off_history, off_dir = run(config_file, tmp_path, "off")
        assert on["restarts"] >= 2 and off["restarts"] >= 2
        used = [e for e in history if e["event"] == "standby_go"]
        assert on["standby"]["used"] == len(used) >= 1, on["standby"]
        assert off["standby"] == {"started": 0, "used": 0, "max_bytes": 0}
        assert not any(e["event"].startswith("standby") for e in off_history)
        # A standby's memory counts in the job's total and never takes it over the budget.
        assert 0 < on["standby"]["max_bytes"] < STANDBY_BOUND
        assert on["samples_over_budget"] == 0 and on["max_sampled_bytes"] <= on["budget_bytes"]
        # Each life that began as a go resumed from the checkpoint its predecessor left.
        spawns = [e for e in history if e["event"] == "spawn"]
        assert len(spawns) == on["restarts"] + 1
        a, b = weights(on_dir), weights(off_dir)
        assert a.keys() == b.keys()
        for name in a:
            assert mx.array_equal(a[name], b[name]).item(), name


def standby_pids(marker: str) -> list[int]:
    """Live standbys of this test (MLXSUP_STANDBY=1, their checkpoint directory under ``marker``)."""
    found = []
    for proc in psutil.process_iter():
        try:
            env = proc.environ()
            if env.get("MLXSUP_STANDBY") == "1" and marker in env.get("MLXSUP_CHECKPOINT_DIR", "") \
                    and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
        except (psutil.Error, OSError):
            continue
    return found


class TestReplaced:
    """A standby that dies is replaced; the running life is not touched."""

    @pytest.mark.timeout(600)
    def test_a_killed_standby_is_replaced_and_the_life_runs_on(self, config_file: Any, tmp_path: Path,
                                                               spawn: Any) -> None:
        job = {**LEAKY, "standby": "auto", "budget": "1500MiB", "train": {**LEAKY["train"], "steps": 400,
                                                                          "leak_mb_per_step": 2}}
        path = config_file({"j": job})
        summary = tmp_path / "summary.json"
        run = spawn(mlxsupd("run", "-c", str(path), "j", "--summary", str(summary), "--log-format", "json"),
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 240
        while not (pids := standby_pids(str(tmp_path))) and time.monotonic() < deadline and run.poll() is None:
            time.sleep(0.1)
        assert pids, "no standby was started"
        os.killpg(pids[0], signal.SIGKILL)
        assert run.wait(timeout=400) == 0
        result = json.loads(summary.read_text())
        history = read_history(tmp_path / "state" / "jobs" / "j" / "history.jsonl")
        died = [e for e in history if e["event"] == "standby_exit"]
        assert died and died[0]["pid"] == pids[0] and died[0]["code"] == -signal.SIGKILL
        later = [e for e in history if e["event"] == "standby_spawn" and e["time"] > died[0]["time"]]
        assert later, "no standby replaced the one that died"
        assert result["outcome"] == "finished" and result["steps_completed"] == 400
        assert not [e for e in history if e["event"] == "exit" and e.get("code") not in (0, 75)]  # no life crashed
        assert result["standby"]["started"] >= 2

    @pytest.mark.timeout(600)
    def test_a_hung_standby_is_killed_and_replaced(self, config_file: Any, tmp_path: Path, spawn: Any) -> None:
        job = {**LEAKY, "standby": "auto", "budget": "1500MiB", "hang_timeout": 5.0,
               "train": {**LEAKY["train"], "steps": 600, "leak_mb_per_step": 1.5}}
        path = config_file({"j": job})
        summary = tmp_path / "summary.json"
        run = spawn(mlxsupd("run", "-c", str(path), "j", "--summary", str(summary), "--log-format", "json"),
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 240
        while not (pids := standby_pids(str(tmp_path))) and time.monotonic() < deadline and run.poll() is None:
            time.sleep(0.1)
        assert pids, "no standby was started"
        time.sleep(2.0)  # it has imported and waits (it says standby within a second or two)
        os.killpg(pids[0], signal.SIGSTOP)  # silent from now on: no heartbeat
        assert run.wait(timeout=500) == 0
        history = read_history(tmp_path / "state" / "jobs" / "j" / "history.jsonl")
        hung = [e for e in history if e["event"] == "standby_kill" and e["pid"] == pids[0]]
        assert hung and hung[0]["reason"].startswith("standby hung"), hung
        assert [e for e in history if e["event"] == "standby_spawn" and e["time"] > hung[0]["time"]]
        result = json.loads(summary.read_text())
        assert result["outcome"] == "finished" and result["steps_completed"] == 600
        assert not [e for e in history if e["event"] == "exit" and e.get("code") not in (0, 75)]
