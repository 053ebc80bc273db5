"""The benchmark suite runs end to end in quick mode and writes every required result."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import analysis
from bench.common import ROOT
from bench.report import checks, render

REQUIRED = ("overhead_ratio", "reaction_ms", "overshoot_fraction", "recovery_seconds", "goodput",
            "samples_over_kill", "checkpoint_save_ratio", "checkpoint_load_ratio", "control_p99_ms",
            "telemetry_msgs_per_s", "daemon_idle_cpu_fraction", "daemon_rss_bytes", "mlx_lm_ratio",
            "gang_step_rate_ratio", "gang_recovery_seconds")
MAY_BE_NULL = {"control_p99_ms", "telemetry_msgs_per_s"}  # the control plane may not be built yet
GOODPUT_ARMS = ("unsupervised", "stop_at_limit", "shrink_only", "supervised")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_quick_bench_writes_every_required_result(tmp_path: Path, spawn: Any) -> None:
    out = tmp_path / "results.json"
    proc = spawn([sys.executable, "-m", "bench", "--quick", "--out", str(out), "--work-dir", str(tmp_path / "w")],
                 cwd=ROOT)
    assert proc.wait(timeout=360) == 0
    results = json.loads(out.read_text())
    assert results["errors"] == {}
    for key in REQUIRED:
        assert key in results, key
        if key not in MAY_BE_NULL:
            assert results[key] is not None, key
    assert set(results["goodput"]) == set(GOODPUT_ARMS)
    assert all(isinstance(results["goodput"][arm], float) for arm in GOODPUT_ARMS)
    assert results["samples_over_kill"] == 0
    assert results["meta"]["mode"] == "quick"
    assert {row["status"] for row in results["checks"]} <= {"pass", "miss", "n/a", "info"}


def test_recovery_phases_are_split_from_history_and_telemetry() -> None:
    history = [
        {"event": "decision", "action": "checkpoint_exit", "diagnosis": "leak", "step": 9, "time": 10.0},
        {"event": "checkpoint", "step": 10, "time": 10.2},
        {"event": "exit", "code": 75, "time": 10.5},
        {"event": "spawn", "pid": 2, "time": 10.51},
        {"event": "state", "new": "RUNNING", "time": 10.8},
        {"event": "exit", "code": 0, "time": 20.0},
    ]
    telemetry = [{"k": "step", "t": 9.9, "step": 9}, {"k": "step", "t": 10.1, "step": 10},
                 {"k": "step", "t": 10.9, "step": 11}]
    (row,) = analysis.restart_cycles(history, telemetry)
    assert row["checkpoint"] == pytest.approx(0.2)
    assert row["exit"] == pytest.approx(0.3)
    assert row["spawn"] == pytest.approx(0.01)
    assert row["start"] == pytest.approx(0.29)
    assert row["first_step"] == pytest.approx(0.1)
    assert row["total"] == pytest.approx(0.9)


def test_reaction_counts_from_the_first_sample_over_budget() -> None:
    telemetry = [{"k": "sample", "t": 1.0, "bytes": 50}, {"k": "sample", "t": 1.05, "bytes": 120},
                 {"k": "sample", "t": 1.1, "bytes": 130}]
    history = [{"event": "decision", "action": "checkpoint_exit", "diagnosis": "peak", "time": 1.1002},
               {"event": "exit", "code": 75, "time": 1.4}]
    result = analysis.reaction(history, telemetry, budget=100, kill=150)
    assert result["reaction_ms"] == pytest.approx(50.2)
    assert result["exit_ms"] == pytest.approx(350.0)
    assert result["overshoot_bytes"] == 30 and result["overshoot_fraction"] == pytest.approx(0.3)
    assert result["samples_over_kill"] == 0


def test_useful_time_counts_a_redone_step_once() -> None:
    telemetry = [{"k": "step", "step": s, "step_seconds": 1.0} for s in (1, 2, 3)]
    telemetry += [{"k": "step", "step": 3, "step_seconds": 2.0}, {"k": "sample", "bytes": 1}]
    assert analysis.useful_step_seconds(telemetry, target=3) == (4.0, 3)
    assert analysis.goodput(4.0, 8.0, 3, 6)["goodput"] == 0.25


def test_table_marks_missing_values_and_misses() -> None:
    rows = checks({"overhead_ratio": 0.9, "goodput": {"supervised": 0.95}, "control_p99_ms": None})
    by_key = {row["key"]: row for row in rows}
    assert by_key["overhead_ratio"]["status"] == "miss"
    assert by_key["goodput.supervised"]["status"] == "pass"
    assert by_key["control_p99_ms"]["status"] == "n/a"
    assert "overhead_ratio" in render(rows)
