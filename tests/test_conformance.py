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
from tests.conftest import ROOT, run_to_end

pytestmark = pytest.mark.slow  # real worker processes for seconds each

REF = [sys.executable, str(ROOT / "tests" / "_ref_worker.py"), "--steps", "800"]
SDK_EXAMPLE = [sys.executable, str(ROOT / "examples" / "sdk_loop.py"), "3000"]
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
}


def kit(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "protocol.conformance", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[int, dict[str, Any]]]]:
    """Every kit run of this module, eight at a time: name -> (exit status, JSON report)."""
    jobs: dict[str, list[str]] = {
        "python-sdk": ["--json", "--", *SDK_EXAMPLE],
        "reference": ["--json", "--", *REF],
        **{mode: ["--json", "--timeout", "3", "--only", check, "--", *REF, "--break", mode]
           for mode, check in BROKEN.items()},
    }

    def one(args: list[str]) -> tuple[int, dict[str, Any]]:
        done = kit(*args)
        assert done.stdout, done.stderr[-2000:]
        return done.returncode, json.loads(done.stdout)

    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = {name: pool.submit(one, args) for name, args in jobs.items()}
        yield {name: future.result() for name, future in futures.items()}


class TestConformingWorkers:
    """The Python SDK's example and the spec's reference worker pass every check."""

    @pytest.mark.parametrize("name", ["python-sdk", "reference"])
    def test_every_check_passes(self, runs: dict[str, tuple[int, dict[str, Any]]], name: str) -> None:
        code, report = runs[name]
        failed = [c for c in report["checks"] if not c["ok"]]
        assert not failed, failed
        assert code == 0
        assert [c["check"] for c in report["checks"]] == list(CHECKS)
        assert report["passed"] == len(CHECKS) and report["failed"] == 0


class TestBrokenWorkers:
    """A worker that breaks one rule fails the check about that rule, and the kit exits 1."""

    @pytest.mark.parametrize("mode", sorted(BROKEN))
    def test_the_right_check_fails(self, runs: dict[str, tuple[int, dict[str, Any]]], mode: str) -> None:
        code, report = runs[mode]
        assert [(c["check"], c["ok"]) for c in report["checks"]] == [(BROKEN[mode], False)], report
        assert report["checks"][0]["detail"]
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
