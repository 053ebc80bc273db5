"""Shared plumbing of the benchmarks: child processes killed by group, configs, supervised runs, statistics."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from supervisor.config import write_config

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
# The scaled-down model of the test suite: steps of ~10-30 ms on 2 cores keep the suite inside its budget.
SMALL: dict[str, Any] = {"dim": 32, "layers": 1, "heads": 2, "context": 32}
MiB = 1 << 20


class BenchError(RuntimeError):
    """A benchmark could not run (a child timed out, a file is missing); the message says which."""


class Child:
    """A child process leading its own process group; the whole group is SIGKILLed on the way out."""

    def __init__(self, argv: Sequence[str], *, env: dict[str, str] | None = None, cwd: Path | None = None,
                 stdout: IO[Any] | int | None = subprocess.DEVNULL,
                 stderr: IO[Any] | int | None = subprocess.DEVNULL) -> None:
        self.argv = list(argv)
        self.popen = subprocess.Popen(self.argv, env=child_env(env), cwd=cwd or ROOT, stdin=subprocess.DEVNULL,
                                      stdout=stdout, stderr=stderr, start_new_session=True)
        self.pid = self.popen.pid

    def wait(self, timeout: float) -> int:
        """Exit status; on timeout the group is killed and BenchError raised."""
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise BenchError(f"{' '.join(self.argv[:6])} ... did not finish within {timeout:.0f}s") from None

    def wait_rusage(self, timeout: float) -> tuple[int, float]:
        """(exit status, CPU seconds of the child and every descendant it reaped) via wait4; on timeout the
        group is killed and BenchError raised."""
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(self.pid, os.WNOHANG)
            if pid == self.pid:
                self.popen.returncode = os.waitstatus_to_exitcode(status)
                return self.popen.returncode, usage.ru_utime + usage.ru_stime
            if time.monotonic() > deadline:
                self.kill()
                raise BenchError(f"{' '.join(self.argv[:6])} ... did not finish within {timeout:.0f}s")
            time.sleep(0.02)

    def wait_for_path(self, path: Path, timeout: float) -> bool:
        """Whether ``path`` exists within ``timeout`` s (waiting only while the child runs): a socket it binds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.popen.poll() is None:
            if path.exists():
                return True
            time.sleep(0.05)
        return path.exists()

    def stop(self, timeout: float) -> int | None:
        """SIGTERM the group and wait up to ``timeout`` s: the exit status, or None after killing the group."""
        self.signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def signal(self, signum: int) -> None:
        if self.popen.poll() is None:
            try:
                os.killpg(self.pid, signum)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """SIGKILL the group (stragglers too, even after the leader exited) and reap the leader."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
            pass

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Our environment with the repository importable (``python -m bench.*`` children) and unbuffered output."""
    env = {**os.environ, **(extra or {})}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    for name in [k for k in env if k.startswith("MLXSUP_") and k != "MLXSUP_TEST_MARK"]:
        del env[name]  # never let a daemon's spawn settings leak into a child we start ourselves
    return env


def run_child(argv: Sequence[str], timeout: float, log: Path | None = None, **kw: Any) -> int:
    """Run a child to its end (group-killed on timeout); output to ``log`` when given."""
    return run_child_rusage(argv, timeout, log, **kw)[0]


def run_child_rusage(argv: Sequence[str], timeout: float, log: Path | None = None, **kw: Any) -> tuple[int, float]:
    """Like run_child, also returning the CPU seconds of the child and the descendants it reaped."""
    if log is None:
        with Child(argv, **kw) as child:
            return child.wait_rusage(timeout)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out, Child(argv, stdout=out, stderr=subprocess.STDOUT, **kw) as child:
        return child.wait_rusage(timeout)


@contextmanager
def short_run_dir() -> Iterator[Path]:
    """A private (0700) directory under /tmp for ipc sockets: deep work dirs would exceed the ipc path limit."""
    path = Path(tempfile.mkdtemp(prefix="mlxsup-b-", dir="/tmp"))
    os.chmod(path, 0o700)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@dataclasses.dataclass
class SupervisedRun:
    """The artefacts of one ``mlxsupd run``."""

    code: int
    summary: dict[str, Any]
    history: list[dict[str, Any]]
    telemetry: list[dict[str, Any]]
    job_dir: Path
    wall: float
    cpu_seconds: float  # mlxsupd and every worker it reaped


def run_supervised(work: Path, job: dict[str, Any], timeout: float, name: str = "j") -> SupervisedRun:
    """Supervise one job with ``mlxsupd run`` in ``work`` (its state dir) and collect what it recorded."""
    from supervisor.daemon.history import read_history
    from supervisor.daemon.recorder import read_records

    work.mkdir(parents=True, exist_ok=True)
    summary_path = work / "summary.json"
    with short_run_dir() as run_dir:
        config = write_config(work / "mlxsup.toml", {"run_dir": str(run_dir), "state_dir": str(work / "state")},
                              {name: job})
        argv = [PYTHON, "-m", "supervisor.cli.mlxsupd", "run", "-c", str(config), name, "--summary", str(summary_path),
                "--log-format", "json"]
        started = time.monotonic()
        code, cpu = run_child_rusage(argv, timeout, log=work / "mlxsupd.log")
        wall = time.monotonic() - started
    if not summary_path.exists():
        raise BenchError(f"mlxsupd run wrote no summary (exit {code}); see {work / 'mlxsupd.log'}")
    job_dir = work / "state" / "jobs" / name
    return SupervisedRun(code, json.loads(summary_path.read_text()), read_history(job_dir / "history.jsonl"),
                         read_records(job_dir / "telemetry.jsonl"), job_dir, wall, cpu)


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BenchError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise BenchError(f"{path}: expected a JSON object")
    return data


def median(values: Sequence[float]) -> float | None:
    return float(statistics.median(values)) if values else None


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """Nearest-rank percentile (``fraction`` in 0..1); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-fraction * len(ordered) // 1))))
    return float(ordered[rank - 1])


def atomic_write_json(path: Path, data: Any) -> None:
    """Write JSON to a temp file next to ``path``, fsync it, and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def rounded(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)
