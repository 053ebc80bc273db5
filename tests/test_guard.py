"""Guard-only jobs (sdk = false): any command under outside sampling alone, with real processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from supervisor.config import ConfigError, parse_config
from supervisor.daemon.history import read_history
from tests.conftest import ROOT, mlxsupd

LEAK = str(ROOT / "tests" / "workers" / "plain_leak.py")
SPIKE = str(ROOT / "tests" / "workers" / "plain_spike.py")
SDK_WORDS = {"batch", "accum", "next_batch", "next_accum", "step", "checkpoint", "from_checkpoint", "goodbye"}


def run(config_file: Any, tmp_path: Path, argv: list[str], **job: Any) -> tuple[int, dict[str, Any],
                                                                                    list[dict[str, Any]]]:
    job = {"command": [sys.executable, LEAK, *argv], "sdk": False, "budget": "400MiB", "kill_grace": 1.0,
           "hang_timeout": 0.5, "startup_timeout": 0.5, **job}
    path = config_file({"j": job})
    summary = tmp_path / "summary.json"
    done = subprocess.run(mlxsupd("run", "-c", str(path), "j", "--summary", str(summary), "--log-format", "json"),
                          capture_output=True, text=True, timeout=120)
    assert summary.exists(), done.stderr[-3000:]
    return done.returncode, json.loads(summary.read_text()), read_history(
        tmp_path / "state" / "jobs" / "j" / "history.jsonl")


def kills(history: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(e["signal"], e["reason"]) for e in history if e["event"] == "kill"]


class TestConfig:
    """sdk = false needs a command; restart is for guard-only jobs."""

    def test_guard_job_without_command_is_refused(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match="needs a 'command'"):
            parse_config({"jobs": {"j": {"sdk": False}}}, tmp_path / "c.toml", total_memory=16 << 30)

    def test_restart_on_an_sdk_job_is_refused(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match="applies to guard-only jobs"):
            parse_config({"jobs": {"j": {"restart": "never"}}}, tmp_path / "c.toml", total_memory=16 << 30)

    def test_bad_restart_value_names_itself(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match="'sometimes'"):
            parse_config({"jobs": {"j": {"command": ["x"], "sdk": False, "restart": "sometimes"}}},
                         tmp_path / "c.toml", total_memory=16 << 30)


@pytest.mark.slow
class TestGuardOnly:
    """No hello is expected; the budget is enforced with signals; the summary says what happened."""

    def test_a_quiet_command_runs_to_its_end_though_it_never_says_hello(self, config_file: Any,
                                                                        tmp_path: Path) -> None:
        code, summary, history = run(config_file, tmp_path, ["15", "1", "--seconds", "0.1"])
        assert code == 0 and summary["outcome"] == "finished" and summary["restarts"] == 0
        assert kills(history) == []  # 1.5 s of silence with hang_timeout 0.5 s: not a hang
        assert summary["samples"] > 5

    def test_budget_breach_is_sigterm_and_restart_never_stops_it(self, config_file: Any, tmp_path: Path) -> None:
        code, summary, history = run(config_file, tmp_path, ["200", "20"], restart="never")
        assert code == 1 and summary["outcome"] == "stopped"
        assert [signal for signal, _ in kills(history)] == ["SIGTERM"]
        assert summary["restarts"] == 0 and summary["samples_over_kill"] == 0
        last = [e for e in history if e["event"] == "state"][-1]
        assert last["new"] == "STOPPED" and "restart = never" in last["reason"]

    def test_a_command_ignoring_sigterm_gets_sigkill_after_kill_grace(self, config_file: Any,
                                                                      tmp_path: Path) -> None:
        _, summary, history = run(config_file, tmp_path, ["200", "20", "--ignore-term"], restart="never",
                                  kill="300%")
        assert [signal for signal, _ in kills(history)] == ["SIGTERM", "SIGKILL"]
        assert summary["outcome"] == "stopped"

    def test_the_kill_ceiling_is_sigkill_at_once(self, config_file: Any, tmp_path: Path) -> None:
        # A kill_grace of 30 s: a SIGKILL within the run can only come from the ceiling (a SIGTERM at the budget
        # may come first when the growth spans two samples inside the budget band).
        _, summary, history = run(config_file, tmp_path, ["30", "300", "--seconds", "0.5", "--ignore-term"],
                                  restart="never", kill="110%", kill_grace=30.0)
        signal, reason = kills(history)[-1]
        assert signal == "SIGKILL" and "kill ceiling" in reason
        assert summary["wall_seconds"] < 20

    def test_on_breach_starts_over_then_gives_up_after_breaches_in_a_row(self, config_file: Any,
                                                                          tmp_path: Path) -> None:
        code, summary, history = run(config_file, tmp_path, ["200", "20"], max_attempts_without_progress=3)
        assert code == 1 and summary["outcome"] == "fatal"
        assert summary["restarts"] == 2 and set(summary["restart_reasons"]) <= {"leak", "kill_ceiling"}
        assert len(kills(history)) == 3
        assert "3 breaches in a row" in [e for e in history if e["event"] == "state"][-1]["reason"]


def sdk_words(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records that speak of batches, steps or checkpoints."""
    return [e for e in history if SDK_WORDS & set(e) or e.get("action") == "checkpoint_exit"]


@pytest.mark.slow
class TestOwnTerms:
    """A guard-only life is diagnosed from its samples: leak or spike per second, no batch, step or checkpoint."""

    @pytest.mark.parametrize("sdk", [False, "auto"])
    def test_a_script_leaking_40mb_per_step_is_a_leak_with_no_batch_anywhere(self, config_file: Any,
                                                                          tmp_path: Path, sdk: Any) -> None:
        # The case: it used to read "peak (transient ... B/step); batch 8x1 -> 4x2", {"peak": 2}.
        code, summary, history = run(config_file, tmp_path, ["200", "40"], budget="1GiB", sdk=sdk,
                                     max_attempts_without_progress=2)
        assert code == 1 and summary["outcome"] == "fatal" and summary["guard_only"] is True
        decisions = [e for e in history if e["event"] == "decision"]
        assert decisions and all(d["diagnosis"] == "leak" and d["action"] == "terminate" for d in decisions)
        assert decisions[0]["reason"].startswith("leak ") and "MiB/s" in decisions[0]["reason"]
        assert decisions[0]["growth_bytes_per_second"] > 50 * 2**20
        assert summary["restart_reasons"] == {"leak": 1}
        assert sdk_words(history) == []
        assert summary["batch_history"] == [] and summary["steps_completed"] is None
        assert summary["first_breach_step"] is None and summary["target_steps"] is None

    def test_one_sudden_allocation_is_a_spike(self, config_file: Any, tmp_path: Path) -> None:
        job = {"command": [sys.executable, SPIKE, "4", "600"], "restart": "never", "kill": "300%"}
        code, summary, history = run(config_file, tmp_path, [], **job)
        decisions = [e for e in history if e["event"] == "decision"]
        assert code == 1 and [d["diagnosis"] for d in decisions] == ["spike"] and summary["guard_only"]
        assert decisions[0]["reason"].startswith("spike: sample ") and sdk_words(history) == []


@pytest.mark.slow
class TestAutoWithTheSdk:
    """sdk = "auto" and a worker that says hello: an SDK job, recycled from its checkpoints."""

    @pytest.mark.timeout(300)
    def test_a_leaking_sdk_worker_finishes_with_recycles(self, config_file: Any, tmp_path: Path) -> None:
        path = config_file({"j": {"sdk": "auto", "budget": "700MiB", "train": {"steps": 120, "leak_mb_per_step": 25}}})
        summary_path = tmp_path / "summary.json"
        done = subprocess.run(mlxsupd("run", "-c", str(path), "j", "--summary", str(summary_path), "--log-format",
                                      "json"), capture_output=True, text=True, timeout=280)
        summary = json.loads(summary_path.read_text())
        assert done.returncode == 0 and summary["outcome"] == "finished" and summary["guard_only"] is False
        assert summary["steps_completed"] == 120 and summary["restarts"] >= 1
        assert set(summary["restart_reasons"]) <= {"leak", "leak_predicted"}
        history = read_history(tmp_path / "state" / "jobs" / "j" / "history.jsonl")
        assert any(e["event"] == "spawn" and e.get("from_checkpoint") for e in history)  # resumed, not from scratch
