"""Shared fixtures: short private run dirs, config files, and a guarantee that no worker outlives a test."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from supervisor.config import write_config

ROOT = Path(__file__).resolve().parent.parent
# A small model keeps end-to-end tests fast on 2 cores; data is the stdlib's own sources.
SMALL = {"dim": 32, "layers": 1, "heads": 2, "context": 32}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The platform marks (registered in pyproject.toml): ``linux_only(reason)`` skips a test off Linux (it reads
    /proc, uses pidfd, epoll or systemd, or needs Linux namespaces), ``darwin_only(call)`` skips a real macOS call
    off macOS. Either way the reason names the platform, so a skip says why it did not run here."""
    for item in items:
        for mark in item.iter_markers("linux_only"):
            if not sys.platform.startswith("linux"):
                item.add_marker(pytest.mark.skip(reason=f"Linux only ({_mark_text(mark)}); this is {sys.platform}"))
        for mark in item.iter_markers("darwin_only"):
            if sys.platform != "darwin":
                item.add_marker(pytest.mark.skip(
                    reason=f"macOS only (the real call: {_mark_text(mark)}); this is {sys.platform}"))


def _mark_text(mark: pytest.Mark) -> str:
    if len(mark.args) != 1 or not isinstance(mark.args[0], str) or not mark.args[0]:
        raise pytest.UsageError(f"@pytest.mark.{mark.name} takes one string, what it needs: got {mark.args!r}")
    return mark.args[0]


@pytest.fixture
def run_dir() -> Iterator[Path]:
    """A short private directory for ipc sockets (pytest's tmp_path can exceed the ipc path limit)."""
    path = Path(tempfile.mkdtemp(prefix="mlxsup-t-", dir="/tmp"))
    os.chmod(path, 0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def config_file(tmp_path: Path, run_dir: Path) -> Any:
    """Factory: write a config with the test's private state and run dirs."""

    def make(jobs: dict[str, dict[str, Any]], **daemon: Any) -> Path:
        daemon = {"run_dir": str(run_dir), "state_dir": str(tmp_path / "state"), **daemon}
        return write_config(tmp_path / "mlxsup.toml", daemon, jobs)

    return make


def _ours(proc: psutil.Process, marker: str) -> bool:
    try:
        env = proc.environ()
        return any(marker in v for v in (env.get("MLXSUP_CHECKPOINT_DIR", ""), env.get("MLXSUP_TEST_MARK", "")))
    except (psutil.Error, OSError):
        return False


@pytest.fixture(autouse=True)
def no_orphans(tmp_path: Path) -> Iterator[None]:
    """Fail a test that leaves a worker (or daemon) of its own running; kill them either way."""
    yield
    marker = str(tmp_path)
    deadline = time.monotonic() + 8
    leftovers: list[psutil.Process] = []
    while time.monotonic() < deadline:
        leftovers = [p for p in psutil.process_iter() if p.pid != os.getpid() and _ours(p, marker)]
        leftovers = [p for p in leftovers if p.status() != psutil.STATUS_ZOMBIE]
        if not leftovers:
            return
        time.sleep(0.2)
    for proc in leftovers:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()
    pytest.fail(f"orphan processes left by the test: {[(p.pid, p.cmdline()) for p in leftovers]}")


class Proc:
    """A child process in its own group, killed (group-wide) and reaped at teardown."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None, **kw: Any) -> None:
        self.popen = subprocess.Popen(argv, env=env, start_new_session=True, **kw)

    def kill(self) -> None:
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait(timeout=10)


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Any]:
    """Factory for child processes that are always killed by process group afterwards."""
    procs: list[Proc] = []

    def start(argv: list[str], env: dict[str, str] | None = None, **kw: Any) -> subprocess.Popen[bytes]:
        full_env = {**os.environ, **(env or {}), "MLXSUP_TEST_MARK": str(tmp_path)}
        proc = Proc(argv, full_env, **kw)
        procs.append(proc)
        return proc.popen

    yield start
    for proc in procs:
        proc.kill()


def mlxsupd(*args: str) -> list[str]:
    return [sys.executable, "-m", "supervisor.cli.mlxsupd", *args]


def run_to_end(config: Path, job: str, summary: Path, timeout: float = 240,
               ) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """``mlxsupd run`` one job of ``config`` to its end; the finished process and its JSON summary."""
    done = subprocess.run(mlxsupd("run", "-c", str(config), job, "--summary", str(summary), "--log-format", "json"),
                          capture_output=True, text=True, timeout=timeout)
    assert summary.exists(), done.stderr[-3000:]
    return done, json.loads(summary.read_text())


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Say in one line, at the end where people and CI look, when the Rust SDK could not be tested here."""
    reasons = {str(getattr(report, "longrepr", "")) for report in terminalreporter.stats.get("skipped", [])}
    rust = sorted({r for r in reasons if "Rust SDK not tested" in r})
    if rust:
        reason = rust[0].split("Rust SDK not tested: ", 1)[1].rstrip("')")
        terminalreporter.write_line(f"NOT RUN: the Rust SDK tests (sdk/rust): {reason}", yellow=True, bold=True)
