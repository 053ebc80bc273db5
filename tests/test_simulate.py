"""The policy replayed on a synthetic 72 GiB machine (supervisor.tools.simulate): behaviours, output and CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from supervisor.tools.simulate import POLICIES, Result, build_parser, scenario_from_args, simulate

ROOT = Path(__file__).resolve().parent.parent
LEAK = ("--memory", "72GiB", "--leak-mb", "100", "--steps", "10000", "--batch", "64")
REQUIRED_KEYS = {
    "policy", "steps_target", "steps_completed", "goodput", "restarts", "batch_reductions",
    "max_memory_bytes", "budget_bytes", "kill_bytes", "samples_over_budget", "samples_over_kill",
    "wall_seconds", "outcome", "batch_history",
}


def run(*argv: str, policy: str = "adaptive") -> Result:
    """Simulate in-process with the CLI's own parsing and validation."""
    parser = build_parser()
    return simulate(scenario_from_args(parser, parser.parse_args(list(argv))), policy)


def cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "supervisor.tools.simulate", *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def effective(result: Result) -> set[int]:
    return {batch * accum for _, batch, accum in result.batch_history}


@pytest.fixture(scope="module")
def leak_results() -> dict[str, Result]:
    return {policy: run(*LEAK, policy=policy) for policy in POLICIES}


class TestLeak:
    """100 MiB/step on 72 GiB: adaptive recycles at full batch, shrink-only pays for shrinking."""

    def test_adaptive_finishes_at_full_batch_under_budget(self, leak_results: dict[str, Result]) -> None:
        result = leak_results["adaptive"]
        assert result.outcome == "finished"
        assert result.steps_completed == 10000
        assert result.batch_reductions == 0
        assert result.batch_history == [[0, 64, 1]]
        assert result.max_memory_bytes <= result.budget_bytes
        assert result.samples_over_budget == 0
        assert result.goodput >= 0.9
        assert result.restarts > 0
        assert set(result.restart_reasons) == {"leak_predicted"}

    def test_shrink_only_shrinks_to_batch_one(self, leak_results: dict[str, Result]) -> None:
        result, adaptive = leak_results["shrink-only"], leak_results["adaptive"]
        assert result.batch_history[-1][1:] == [1, 64]
        assert result.batch_reductions == 6
        assert effective(result) == {64}
        assert result.samples_over_budget > 0
        assert result.outcome == "fatal" or result.efficiency < adaptive.efficiency - 0.1

    def test_stop_stops_at_the_first_breach(self, leak_results: dict[str, Result]) -> None:
        result = leak_results["stop"]
        assert result.outcome == "stopped"
        assert result.restarts == 0
        assert 0 < result.steps_completed < 10000


class TestPeak:
    """A per-step peak alone: one shrink, the effective batch kept, no regrowth back into the breach."""

    def test_adaptive_shrinks_exactly_once(self) -> None:
        result = run("--leak-mb", "0", "--peak-mb-per-sample", "960")
        assert result.outcome == "finished"
        assert result.batch_reductions == 1
        assert result.batch_history == [[0, 64, 1], [1, 32, 2]]
        assert effective(result) == {64}
        assert result.restart_reasons == {"peak": 1}
        assert result.samples_over_kill == 0

    def test_peak_over_the_kill_ceiling_is_killed_then_shrunk(self) -> None:
        result = run("--leak-mb", "0", "--peak-mb-per-sample", "1100")
        assert result.outcome == "finished"
        assert result.samples_over_kill == 1
        assert result.batch_history == [[0, 64, 1], [0, 32, 2]]
        assert result.steps_lost == 0

    def test_no_batch_fits_is_fatal_after_max_attempts(self) -> None:
        result = run("--leak-mb", "0", "--peak-mb-per-sample", "70000", "--max-attempts", "5")
        assert result.outcome == "fatal"
        # As the daemon does: each smaller batch is a new attempt (64 -> 1 in 6 shrinks), then 5 attempts at
        # batch 1 without a checkpoint end in FATAL. (The simulator's old copy of the ladder gave up after 4.)
        assert [b[1] for b in result.batch_history] == [64, 32, 16, 8, 4, 2, 1]
        assert result.restarts == 6 + 4
        assert result.steps_completed == 0


class TestLeakAndPeak:
    """A leak on top of a per-step peak."""

    def test_peak_that_fits_leaves_the_batch_alone(self) -> None:
        result = run("--leak-mb", "100", "--peak-mb-per-sample", "500")
        assert result.outcome == "finished"
        assert result.batch_reductions == 0
        assert result.max_memory_bytes <= result.budget_bytes
        assert result.goodput >= 0.9

    def test_peak_over_budget_shrinks_once_then_recycles(self) -> None:
        result = run("--leak-mb", "100", "--peak-mb-per-sample", "960")
        assert result.outcome == "finished"
        assert result.batch_reductions == 1
        assert effective(result) == {64}
        assert result.restart_reasons["peak"] == 1
        assert result.restart_reasons["leak_predicted"] > 0
        assert result.goodput >= 0.9

    def test_short_lives_from_a_predicted_leak_shrink(self) -> None:
        result = run("--leak-mb", "100", "--peak-mb-per-sample", "900", "--steps", "2000")
        assert result.batch_reductions >= 1
        assert result.goodput >= 0.9


class TestJson:
    """--json prints one object with the documented keys; --compare --json one per policy."""

    def test_single_policy(self) -> None:
        proc = cli(*LEAK, "--steps", "500", "--json")
        assert proc.returncode == 0, proc.stderr
        data = json.loads(proc.stdout)
        assert set(data) >= REQUIRED_KEYS
        assert data["policy"] == "adaptive"
        assert data["outcome"] in ("finished", "fatal", "stopped")

    def test_compare(self) -> None:
        proc = cli(*LEAK, "--steps", "2000", "--compare", "--json")
        data: dict[str, Any] = json.loads(proc.stdout)
        assert set(data) == set(POLICIES)
        assert all(set(result) >= REQUIRED_KEYS for result in data.values())
        assert proc.returncode == 1  # 'stop' did not finish

    def test_table(self) -> None:
        proc = cli(*LEAK, "--steps", "2000", "--compare")
        assert all(policy in proc.stdout for policy in POLICIES)
        assert "goodput" in proc.stdout


class TestCli:
    """Bad arguments exit 2 with a message naming the option and the value."""

    @pytest.mark.parametrize(("argv", "named"), [
        (("--steps", "0"), "--steps: 0"),
        (("--batch", "-4"), "--batch: -4"),
        (("--memory", "lots"), "'lots'"),
        (("--budget", "150%"), "'150%'"),
        (("--leak-mb", "nan"), "--leak-mb: nan"),
        (("--min-batch", "128"), "--min-batch: 128"),
        (("--kill", "90%"), "'90%'"),
        (("--policy", "yolo"), "'yolo'"),
    ])
    def test_error_names_the_value(self, argv: tuple[str, ...], named: str) -> None:
        proc = cli(*argv)
        assert proc.returncode == 2
        assert named in proc.stderr
        assert proc.stdout == ""


class TestDeterminism:
    """Same seed, same output; another seed, other noise."""

    def test_same_seed_same_json(self) -> None:
        argv = (*LEAK, "--steps", "3000", "--noise-mb", "200", "--peak-mb-per-sample", "300", "--json")
        first, second = cli(*argv, "--seed", "7"), cli(*argv, "--seed", "7")
        assert first.stdout == second.stdout
        other = cli(*argv, "--seed", "8")
        assert json.loads(other.stdout)["max_memory_bytes"] != json.loads(first.stdout)["max_memory_bytes"]
