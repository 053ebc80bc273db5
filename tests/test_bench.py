"""The benchmark suite runs end to end in quick mode and writes every required result."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import analysis, lockstep
from bench.common import ROOT
from bench.report import checks, render

REQUIRED = ("overhead_ratio", "reaction_ms", "overshoot_fraction", "recovery_seconds", "goodput",
            "samples_over_kill", "checkpoint_save_ratio", "checkpoint_load_ratio", "control_p99_ms",
            "telemetry_msgs_per_s", "daemon_idle_cpu_fraction", "daemon_rss_bytes", "mlx_lm_ratio",
            "gang_step_rate_ratio", "gang_recovery_seconds", "standby")
MAY_BE_NULL = {"control_p99_ms", "telemetry_msgs_per_s"}  # the control plane may not be built yet
GOODPUT_ARMS = ("unsupervised", "stop_at_limit", "shrink_only", "supervised")


@pytest.mark.slow
@pytest.mark.timeout(550)  # the standby section adds about 150 s on a loaded machine
def test_quick_bench_writes_every_required_result(tmp_path: Path, spawn: Any) -> None:
    out = tmp_path / "results.json"
    proc = spawn([sys.executable, "-m", "bench", "--quick", "--out", str(out), "--work-dir", str(tmp_path / "w")],
                 cwd=ROOT)
    assert proc.wait(timeout=510) == 0
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


class TestLockstep:
    """The lockstep overhead counts only steps that ran wholly inside one slice of their arm."""

    def test_a_step_cut_by_a_freeze_is_dropped(self) -> None:
        slices = [(10.0, 10.25), (10.5, 10.75)]
        rows = [(1, 0.0, 10.02), (2, 0.0, 10.12), (3, 0.0, 10.22),  # 2 and 3 ran inside the first slice
                (4, 0.0, 10.55),  # began at 10.22 in the first slice, ended in the second: cut by the freeze
                (5, 0.0, 10.65), (6, 0.0, 10.80)]  # 5 counts; 6 ended after the second slice closed
        assert [[round(d, 3) for d in found] for found in lockstep.counted_steps(rows, slices)] == [
            [0.1, 0.1], [0.1]]

    def test_ratio_is_supervised_over_unsupervised_steps_per_second_with_an_interval_around_it(self) -> None:
        unsup = [[0.020] * 10 for _ in range(40)]
        sup = [[0.020] * 9 + [0.030] for _ in range(40)]  # one slow step in ten: 0.210 s per 10 steps
        result = lockstep.summarize(unsup, sup)
        assert result["ratio"] == pytest.approx(0.200 / 0.210, abs=1e-4)
        assert result["ci95"][0] <= result["ratio"] <= result["ci95"][1]
        assert result["median_ratio"] == pytest.approx(1.0)  # the median cannot see a rare slow step
        assert result["steps"] == {"unsupervised": 400, "supervised": 400}

    def test_cpu_ratio_counts_the_daemon_with_its_worker(self) -> None:
        cpu = lockstep.cpu_summary([0.25] * 20, [10] * 20, [0.26] * 20, [10] * 20)
        assert cpu["ratio"] == pytest.approx(0.25 / 0.26, abs=1e-4)
        assert cpu["ms_per_step"] == {"unsupervised": 25.0, "supervised": 26.0}


def test_forensics_section_measures_a_census_and_attribution_side_by_side(tmp_path: Path) -> None:
    from bench import forensics

    result = forensics.measure(tmp_path, census_repeats=2, messages=200, blocks=1, timeout=300)
    for model in ("builtin", "tiny_mlx_lm"):
        census = result["census_ms"][model]
        assert census["ms"] > 0 and census["arrays"] > 10 and census["visited"] >= census["arrays"]
    assert result["daemon_cpu_us_per_msg_without"] > 0 and result["daemon_cpu_us_per_msg_with"] > 0
    assert result["attribution_cpu_ratio"] > 0
    assert result["verdict_of_the_life"] == "arrays_retained"  # the attributed arm really ran the diagnosis


STANDBY_HISTORY = [
    {"event": "decision", "action": "checkpoint_exit", "diagnosis": "leak", "step": 9, "time": 10.0},
    {"event": "exit", "code": 75, "time": 10.3},
    {"event": "standby_go", "life": 2, "ready": True, "waited": 4.2, "time": 10.31},
    {"event": "spawn", "pid": 2, "time": 10.31},
    {"event": "hello", "pid": 2, "time": 10.35},
    {"event": "decision", "action": "checkpoint_exit", "diagnosis": "leak", "step": 20, "time": 20.0},
    {"event": "exit", "code": 75, "time": 20.2},
    {"event": "spawn", "pid": 3, "time": 20.21},
    {"event": "hello", "pid": 3, "time": 21.2},
    {"event": "decision", "action": "checkpoint_exit", "diagnosis": "leak", "step": 29, "time": 30.0},
    {"event": "exit", "code": 0, "time": 30.2},
]
STANDBY_TELEMETRY = [{"k": "step", "t": 10.1, "step": 10}, {"k": "step", "t": 10.4, "step": 11},
                     {"k": "step", "t": 21.5, "step": 21}, {"k": "sample", "t": 21.6, "bytes": 1}]


class TestStandbySection:
    """The standby section measures a recovery the same way whether a standby served it or a fresh spawn did."""

    def test_handovers_split_a_go_and_a_spawn_into_the_same_phases(self) -> None:
        from bench.standby import handovers

        first, second = handovers(STANDBY_HISTORY, STANDBY_TELEMETRY)  # the last decision ended the run: no row
        assert first["standby"] and first["standby_ready"] and first["standby_age"] == 4.2
        assert first["exit"] == pytest.approx(0.3) and first["start"] == pytest.approx(0.05)
        assert first["first_step"] == pytest.approx(0.05) and first["total"] == pytest.approx(0.4)
        assert not second["standby"] and second["start"] == pytest.approx(1.0)
        assert second["total"] == pytest.approx(1.5)  # the old life's step at 10.1 is not the next life's

    def test_summary_counts_the_restarts_a_waiting_standby_served(self) -> None:
        from bench.standby import handovers, summarize

        summary = summarize(handovers(STANDBY_HISTORY, STANDBY_TELEMETRY))
        assert (summary["cycles"], summary["from_standby"], summary["from_waiting_standby"]) == (2, 1, 1)
        assert summary["total"] == pytest.approx(0.95) and summary["total_from_waiting_standby"] == 0.4

    def test_no_recycle_compares_the_auto_arms_mean_with_the_off_arms_interval(self) -> None:
        from bench.standby import compare_idle, interval

        off = [0.010, 0.012, 0.011, 0.013, 0.010, 0.012] * 10
        ci = interval(off)
        assert ci is not None and ci[0] <= sum(off) / len(off) <= ci[1]
        assert interval([1.0]) is None
        runs = {"off": [{"step_seconds": list(off), "standby_started": 0}],
                "auto": [{"step_seconds": [0.0112] * 60, "standby_started": 1}]}
        same = compare_idle(runs)
        assert same["within_off_interval"] is True and same["standby_waited"] is True
        runs = {"off": [{"step_seconds": list(off), "standby_started": 0}],
                "auto": [{"step_seconds": [0.02] * 60, "standby_started": 1}]}
        slower = compare_idle(runs)
        assert slower["within_off_interval"] is False and slower["step_rate_ratio"] < 0.6
