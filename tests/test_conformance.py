"""The conformance kit: conforming workers pass every check, and each deliberately broken worker fails its own.

All kit runs of this module go in one pool (they mostly wait on bounded timeouts), so the module costs about as
much as its slowest run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from protocol.conformance import CHECKS
from protocol.conformance.checks import LIVES
from tests.conftest import ROOT, run_to_end

pytestmark = pytest.mark.slow  # real worker processes for seconds each

REF = [sys.executable, str(ROOT / "tests" / "_ref_worker.py"), "--steps", "2000"]
SDK_EXAMPLE = [sys.executable, str(ROOT / "examples" / "sdk_loop.py"), "6000", "3"]  # paced as the Rust one
# Each broken mode of tests/_ref_worker.py and the one check it must fail.
BROKEN = {
    "wrong_token": "hello",
    "ms_seconds": "step_telemetry",
    "mid_step_checkpoint": "commands_at_step_boundaries",
    "bad_hash": "checkpoint_valid",
    "acts_on_invalid": "malformed_frames_survived",
    "crash_on_garbage": "malformed_frames_survived",
    "strict_fields": "unknown_fields_ignored",
    "exit_zero": "checkpoint_exit",
    "fresh_start": "resume",
    "deaf": "lost_daemon",
    "no_sigterm": "sigterm",
    "keep_all": "keep_checkpoints",
    "no_finish_goodbye": "finish",
    "reads_parts": "multipart_refused",  # reads each part of a message as a frame of its own
    "steps_past_target": "resume_at_target",  # trains a step past its target after resuming there
    # the 1.1 duties
    "overfull_steps": "holding",  # steps frames of hold_rows + 3 rows
    "no_flush_at_command": "holding",  # keeps holding through a command: checkpoint_saved before the held steps
    "silent_load": "heartbeats_before_hello",  # loads without heartbeats
    "term_at_boundary_only": "sigterm_before_hello",  # SIGTERM during the load waits for a step boundary
    "waits_for_welcome": "no_welcome",  # trains only once welcomed: a wrong token leaves it waiting forever
    "trusts_newest": "damaged_newest_skipped",  # loads the newest checkpoint without verifying it
    "drops_trash": "trash_restored",  # removes a dead writer's .trash instead of renaming it back
    "ignores_parent": "parent_died",  # notices only silence, never a new parent
    "no_keepalive": "keepalive_long_step",  # no heartbeats during a long step
    "no_watchdog": "orphan_watchdog",  # notices an orphaning only at step boundaries
    "timer_from_start": "heartbeats_before_hello",  # counts the silence before its hello: its watchdog ends the load
}
# A broken worker of the 1.1 duties is run through every check of its check's life, and only the broken one may fail
# (the others pass, or were not run because it failed first). The earlier modes break a rule whose effect spills
# over to later checks of their life by nature (a bad hash makes every checkpoint bad): they run their check alone.
NEW_MODES = set(list(BROKEN)[list(BROKEN).index("overfull_steps"):])
LIFE_OF = {check: names for _, names in LIVES for check in names}


def scope(mode: str) -> list[str]:
    """The checks a kit run of broken worker ``mode`` selects."""
    return LIFE_OF[BROKEN[mode]] if mode in NEW_MODES else [BROKEN[mode]]


def kit(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "protocol.conformance", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[int, dict[str, Any]]]]:
    """Every kit run of this module: name -> (exit status, JSON report). The two conforming workers run first,
    by themselves (ten kit runs at once on two cores stretched a busy worker's keepalive gap past the 2 s the
    checks allow), then the broken reference workers ten at a time."""
    conforming: dict[str, list[str]] = {
        "python-sdk": ["--json", "--", *SDK_EXAMPLE],
        "reference": ["--json", "--", *REF],
    }
    broken = {mode: ["--json", "--timeout", "3", "--only", ",".join(scope(mode)), "--", *REF, "--break", mode]
              for mode in BROKEN}

    def one(args: list[str]) -> tuple[int, dict[str, Any]]:
        done = kit(*args)
        assert done.stdout, done.stderr[-2000:]
        return done.returncode, json.loads(done.stdout)

    results: dict[str, tuple[int, dict[str, Any]]] = {}
    for jobs in (conforming, broken):
        with ThreadPoolExecutor(max_workers=10) as pool:
            futures = {name: pool.submit(one, args) for name, args in jobs.items()}
            results.update({name: future.result() for name, future in futures.items()})
    yield results


class TestConformingWorkers:
    """The Python SDK's example and the spec's reference worker pass every check."""

    @pytest.mark.parametrize("name", ["python-sdk", "reference"])
    def test_every_check_passes(self, runs: dict[str, tuple[int, dict[str, Any]]], name: str) -> None:
        code, report = runs[name]
        failed = [c for c in report["checks"] if not c["ok"]]
        assert not failed, "; ".join(f"{c['check']}: {c['detail']}" for c in failed)
        assert code == 0
        assert [c["check"] for c in report["checks"]] == list(CHECKS)
        assert report["passed"] == len(CHECKS) and report["failed"] == 0


class TestBrokenWorkers:
    """A worker that breaks one rule fails the check about that rule, and the kit exits 1."""

    def test_every_check_has_a_broken_worker(self) -> None:
        assert set(BROKEN.values()) == set(CHECKS)

    @pytest.mark.parametrize("mode", sorted(BROKEN))
    def test_the_right_check_fails(self, runs: dict[str, tuple[int, dict[str, Any]]], mode: str) -> None:
        code, report = runs[mode]
        broken = BROKEN[mode]
        results = {c["check"]: c for c in report["checks"]}
        assert list(results) == [name for name in CHECKS if name in scope(mode)]
        assert not results[broken]["ok"] and results[broken]["detail"], report
        others = [c for name, c in results.items() if name != broken
                  and not c["ok"] and not c["detail"].startswith(f"not run: {broken} failed")]
        assert not others, report
        assert code == 1


class TestCommandLine:
    """Usage errors exit 2 with a message; --results merges reports by name."""

    def test_unknown_check_is_a_usage_error(self) -> None:
        done = kit("--only", "hello,telepathy", "--", "true")
        assert done.returncode == 2 and "telepathy" in done.stderr

    def test_missing_command_is_a_usage_error(self) -> None:
        done = kit("--json")
        assert done.returncode == 2 and "no worker command" in done.stderr

    def test_a_worker_that_is_not_a_worker_fails_with_a_table(self, tmp_path: Path) -> None:
        results = tmp_path / "results.json"
        results.write_text(json.dumps({"workers": [{"name": "shell", "passed": 99}, {"name": "other"}]}))
        done = kit("--only", "hello", "--timeout", "1", "--name", "shell", "--results", str(results), "--",
                   "sh", "-c", "echo not a worker; sleep 30")
        assert done.returncode == 1
        assert "hello  FAIL    no frame (hello) within 1 s" in done.stdout
        workers = json.loads(results.read_text())["workers"]
        assert [w["name"] for w in workers] == ["other", "shell"]
        assert workers[1]["failed"] == 1 and workers[1]["command"] == "sh -c 'echo not a worker; sleep 30'"


class TestForwardCompatibility:
    """A newer worker (hello offers protocol 3, unknown fields everywhere) is supervised by this daemon, and an
    older one (a version 1 hello, no protocol field) too: the daemon speaks version 1 to it."""

    def test_newer_worker_runs_to_the_end_under_mlxsupd(self, config_file: Any, tmp_path: Path) -> None:
        path = config_file({"j": {"command": [*REF[:2], "--steps", "60", "--future"], "checkpoint_every": 0,
                                  "env": {"PYTHONPATH": str(ROOT)}}})
        done, summary = run_to_end(path, "j", tmp_path / "s.json", timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        assert summary["outcome"] == "finished" and summary["steps_completed"] == 60
        assert "worker_frame_rejected" not in done.stderr
        stdout = (tmp_path / "state" / "logs" / "jobs" / "j" / "stdout.log").read_text()
        assert "welcome protocol=2" in stdout  # negotiated down to what this daemon speaks

    def test_version_one_worker_runs_to_the_end_under_mlxsupd(self, config_file: Any, tmp_path: Path) -> None:
        """The reference worker sends a hello without ``protocol`` (a 1.0 worker) and reads only v 1 frames."""
        path = config_file({"j": {"command": [*REF[:2], "--steps", "60", "--v1-only"], "checkpoint_every": 0,
                                  "env": {"PYTHONPATH": str(ROOT)}}})
        done, summary = run_to_end(path, "j", tmp_path / "s.json", timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        assert summary["outcome"] == "finished" and summary["steps_completed"] == 60
        assert "worker_frame_rejected" not in done.stderr
        stdout = (tmp_path / "state" / "logs" / "jobs" / "j" / "stdout.log").read_text()
        assert "welcome protocol=1" in stdout and "refused" not in stdout


class TestNegotiatedVersionInStatus:
    """`mlxsupctl status` shows per worker the protocol version its welcome agreed: 1 for a 1.0 worker (a hello
    without ``protocol``), 2 for the Python SDK (a 1.1 worker), side by side under one daemon."""

    def test_status_shows_each_workers_version(self, spawn: Any, config_file: Any, tmp_path: Path) -> None:
        from tests.test_daemon import Daemon

        env = {"PYTHONPATH": str(ROOT)}
        path = config_file({
            "old": {"command": [*REF[:2], "--steps", "100000", "--step-ms", "20", "--v1-only"], "env": env},
            "new": {"command": [*SDK_EXAMPLE[:2], "100000"], "env": env},
        })
        d = Daemon(spawn, path, tmp_path)
        try:
            d.wait(lambda: all(j["protocol"] for j in d.json("status")["jobs"]), 90, "both workers said hello")
            jobs = {j["name"]: j for j in d.json("status")["jobs"]}
            assert (jobs["old"]["protocol"], jobs["new"]["protocol"]) == (1, 2), jobs
            text = subprocess.run(
                [sys.executable, "-m", "supervisor.cli.mlxsupctl", "-c", str(path), "status"],
                capture_output=True, text=True, timeout=30).stdout
            lines = {line.split()[0]: line for line in text.splitlines() if line.split()[:1] in (["old"], ["new"])}
            assert lines["old"].endswith("protocol 1") and lines["new"].endswith("protocol 2"), text
        finally:
            d.stop()
