"""A crashed worker's own words reach the user, and known failures get their own policy: the pure table
(supervisor.core.crashes), the bounded tail read, and real workers under a real daemon (tests/workers/crash_with.py
writes what each failure writes and exits as it would)."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from supervisor.control.commands.jobs import describe, status_line
from supervisor.core.crashes import TAIL_BYTES, TAIL_LINES, CrashPolicy, classify, last_lines
from supervisor.core.states import JobState
from supervisor.daemon.history import read_history
from supervisor.daemon.tails import log_size, stderr_tail
from tests.conftest import ROOT, run_to_end
from tests.test_lifecycle import Service

CRASH = str(ROOT / "tests" / "workers" / "crash_with.py")
NUM_LAYERS = "ValueError: num_layers = 16, but the model has only 4 layers"
TRACEBACK = ("Traceback (most recent call last):", '  File "train.py", line 3, in <module>')


class TestClassify:
    """Each known failure, matched in the last lines of stderr, and the policy it gets."""

    @pytest.mark.parametrize(("code", "lines", "hello", "signature", "policy"), [
        (1, (*TRACEBACK, "RuntimeError: [metal::malloc] Resource limit (499000) exceeded."), True,
         "metal_resource_limit", CrashPolicy.RECYCLE),
        (-6, ("libc++abi: terminating due to uncaught exception of type std::runtime_error: [METAL] Command buffer "
              "execution failed: Insufficient Memory (00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory)",), True,
         "metal_insufficient_memory", CrashPolicy.SHRINK),
        (-6, ("libc++abi: terminating due to uncaught exception of type std::bad_alloc: std::bad_alloc",), True,
         "bad_alloc", CrashPolicy.SHRINK),
        (1, (*TRACEBACK, "MemoryError"), True, "memory_error", CrashPolicy.SHRINK),
        (1, (*TRACEBACK, "MemoryError: cannot allocate"), False, "memory_error", CrashPolicy.SHRINK),
        (2, ("usage: train.py [-h] --data DATA", "train.py: error: the following arguments are required: --data"),
         False, "usage_error", CrashPolicy.FATAL),
        (2, (), False, "usage_error", CrashPolicy.FATAL),  # exit 2 before the hello, even silent
        (1, (*TRACEBACK, NUM_LAYERS), False, "usage_error", CrashPolicy.FATAL),
        (1, (*TRACEBACK, NUM_LAYERS), True, None, CrashPolicy.BACKOFF),  # after the hello: an ordinary crash
        (2, ("train.py: error: bad batch",), True, None, CrashPolicy.BACKOFF),
        (1, (*TRACEBACK, "RuntimeError: boom"), False, None, CrashPolicy.BACKOFF),
        (-9, (), False, None, CrashPolicy.BACKOFF),
    ])
    def test_signature_and_policy(self, code: int, lines: tuple[str, ...], hello: bool, signature: str | None,
                                  policy: CrashPolicy) -> None:
        crash = classify(code, lines, hello)
        assert (crash.signature, crash.policy) == (signature, policy)

    def test_the_record_has_the_agreed_shape(self) -> None:
        assert classify(2, ("x", NUM_LAYERS, ""), False).record() == {
            "exit_code": 2, "signal": None, "stderr_tail": ["x", NUM_LAYERS, ""], "signature": "usage_error"}
        assert classify(-signal.SIGABRT, (), True).record() == {
            "exit_code": None, "signal": "SIGABRT", "stderr_tail": [], "signature": None}

    def test_the_quoted_line_is_the_last_that_is_not_blank(self) -> None:
        crash = classify(1, (*TRACEBACK, NUM_LAYERS, "  "), False)
        assert crash.describe("exit 1") == f"exit 1 [usage_error]: {NUM_LAYERS}"

    def test_the_resource_limit_hint_names_the_fix(self) -> None:
        hint = classify(1, ("[metal::malloc] Resource limit (499000) exceeded",), True).hint
        assert "shapeless=True" in hint and "#4464" in hint


class TestTail:
    """Only a bounded tail of stderr.log is read, and only what the life wrote."""

    def test_a_large_log_yields_its_last_lines(self, tmp_path: Path) -> None:
        path = tmp_path / "stderr.log"
        path.write_text("".join(f"line {i}\n" for i in range(100_000)))
        tail = stderr_tail(path)
        assert len(tail) == TAIL_LINES and tail[-1] == "line 99999"

    def test_lines_before_the_life_began_are_not_its_own(self, tmp_path: Path) -> None:
        path = tmp_path / "stderr.log"
        path.write_text("old life's error\n")
        start = log_size(path)
        with path.open("a") as log:
            log.write("new\n")
        assert stderr_tail(path, start) == ("new",)
        assert stderr_tail(path, start + 4) == ()

    def test_a_log_rotated_since_is_read_from_its_start(self, tmp_path: Path) -> None:
        path = tmp_path / "stderr.log"
        path.write_text("fresh\n")
        assert stderr_tail(path, 10_000) == ("fresh",)

    def test_a_missing_log_is_no_lines(self, tmp_path: Path) -> None:
        assert stderr_tail(tmp_path / "none.log") == ()

    def test_a_chunk_that_began_mid_line_drops_that_line(self) -> None:
        assert last_lines(b"tial\nwhole\n", partial=True) == ("whole",)
        assert len(last_lines(b"x" * (TAIL_BYTES * 2) + b"\nend\n", partial=True)) == 1


class TestStatus:
    """Status carries the last crash and its words (fake OS, real stderr.log)."""

    def test_status_shows_the_last_error(self, tmp_path: Path, run_dir: Path) -> None:
        s = Service(tmp_path, run_dir, {"j": {"command": ["python", "train.py"], "max_attempts_without_progress": 3}})
        try:
            job = s.job("j")
            job.start(s.system.clock)
            path = job.stderr_path(0)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\n".join([*TRACEBACK, "RuntimeError: [metal::malloc] Resource limit (499000) exceeded."]))
            s.proc("j").code = 1
            s.turn()
            row = describe(job)
            assert row["last_error"]["signature"] == "metal_resource_limit" and job.state == JobState.STARTING
            assert row["last_error"]["exit_code"] == 1 and row["restarts"] == 1
            s.proc("j").code = 2  # now says nothing new: the previous life's lines are not this life's
            s.turn()
            assert describe(job)["last_error"]["stderr_tail"] == [] and job.state == JobState.FATAL
            assert "last error (exit 2, usage_error)" in status_line(describe(job))
        finally:
            s.close()


def run(config_file: Any, tmp_path: Path, kind: str, **job: Any) -> tuple[int, dict[str, Any],
                                                                           list[dict[str, Any]]]:
    job = {"command": [sys.executable, CRASH, kind], "budget": "400MiB", "backoff_initial": 0.2,
           "max_attempts_without_progress": 2, "startup_timeout": 30.0, **job}
    done, summary = run_to_end(config_file({"j": job}), "j", tmp_path / "summary.json", timeout=120)
    return done.returncode, summary, read_history(tmp_path / "state" / "jobs" / "j" / "history.jsonl")


def states(history: list[dict[str, Any]]) -> list[str]:
    return [e["new"] for e in history if e["event"] == "state"]


def spawn_batches(history: list[dict[str, Any]]) -> list[int | None]:
    return [e.get("batch") for e in history if e["event"] == "spawn"]


@pytest.mark.slow
class TestRealWorkers:
    """Real workers that fail as each failure does, under `mlxsupd run`."""

    @pytest.mark.parametrize("kind", ["usage", "value_error"])
    def test_a_usage_or_config_error_before_the_hello_is_fatal_at_once_with_its_words(
            self, config_file: Any, tmp_path: Path, kind: str) -> None:
        code, summary, history = run(config_file, tmp_path, kind, max_attempts_without_progress=5)
        assert code == 1 and summary["outcome"] == "fatal" and summary["restarts"] == 0
        assert "BACKOFF" not in states(history) and len(spawn_batches(history)) == 1
        error = summary["last_error"]
        assert error["signature"] == "usage_error" and error["signal"] is None
        assert error["exit_code"] == (2 if kind == "usage" else 1)
        words = "expected one argument" if kind == "usage" else NUM_LAYERS
        assert any(words in line for line in error["stderr_tail"])
        fatal = [e for e in history if e["event"] == "state"][-1]
        assert fatal["new"] == "FATAL" and words in fatal["reason"] and "not retried" in fatal["reason"]
        assert fatal["stderr_tail"] == error["stderr_tail"]

    def test_an_ordinary_crash_backs_off_and_quotes_its_last_line(self, config_file: Any, tmp_path: Path) -> None:
        code, summary, history = run(config_file, tmp_path, "runtime_error")
        assert code == 1 and "BACKOFF" in states(history)
        backoff = next(e for e in history if e["event"] == "state" and e["new"] == "BACKOFF")
        assert backoff["reason"] == "exit 1: RuntimeError: something else went wrong"
        assert summary["last_error"]["stderr_tail"][-1] == "RuntimeError: something else went wrong"
        assert "RuntimeError: something else went wrong" in states_reason(history, "FATAL")

    def test_the_metal_resource_limit_is_a_recycle_not_a_backoff(self, config_file: Any, tmp_path: Path) -> None:
        code, summary, history = run(config_file, tmp_path, "resource_limit")
        assert code == 1 and "BACKOFF" not in states(history)
        assert summary["restart_reasons"] == {"metal_resource_limit": 1}
        assert spawn_batches(history) == [8, 8]
        assert summary["last_error"]["signature"] == "metal_resource_limit"
        exits = [e for e in history if e["event"] == "exit"]
        assert exits[0]["signature"] == "metal_resource_limit" and "shapeless=True" in exits[0]["hint"]

    @pytest.mark.parametrize(("kind", "signal_name"), [("insufficient_memory", "SIGABRT"), ("bad_alloc", "SIGABRT"),
                                                       ("memory_error", None)])
    def test_out_of_memory_restarts_at_once_with_half_the_batch(self, config_file: Any, tmp_path: Path, kind: str,
                                                                signal_name: str | None) -> None:
        code, summary, history = run(config_file, tmp_path, kind)
        signature = "memory_error" if kind == "memory_error" else ("metal_" * (kind != "bad_alloc")) + kind
        assert code == 1 and "BACKOFF" not in states(history)
        assert summary["restart_reasons"] == {signature: 1} and spawn_batches(history) == [8, 4]
        assert summary["last_error"]["signature"] == signature and summary["last_error"]["signal"] == signal_name

    def test_a_guard_only_command_out_of_memory_starts_over_without_a_batch(self, config_file: Any,
                                                                            tmp_path: Path) -> None:
        code, summary, history = run(config_file, tmp_path, "memory_error", sdk=False)
        assert code == 1 and summary["restart_reasons"] == {"memory_error": 1}
        assert spawn_batches(history) == [None, None] and "BACKOFF" not in states(history)

    def test_a_guard_only_command_error_is_fatal_with_its_words(self, config_file: Any, tmp_path: Path) -> None:
        code, summary, history = run(config_file, tmp_path, "value_error", sdk=False)
        assert code == 1 and summary["restarts"] == 0 and NUM_LAYERS in states_reason(history, "FATAL")


def states_reason(history: list[dict[str, Any]], state: str) -> str:
    return next(e["reason"] for e in reversed(history) if e["event"] == "state" and e["new"] == state)
