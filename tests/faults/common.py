"""Shared machinery of the fault campaign: workspaces, configs, process groups, waiting, results.

Every process the campaign starts is a session leader (``start_new_session=True``) and is killed by process
group in a ``finally``; every wait is bounded by a deadline; every socket is ipc or loopback TCP.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import psutil

from supervisor.config import write_config
from supervisor.daemon.history import read_jsonl as json_lines  # noqa: F401 - the campaign reads logs with it
from tests.faults.wire import answers

ROOT = Path(__file__).resolve().parents[2]
MARK_ENV = "MLXSUP_TEST_MARK"  # inherited by daemons and their workers: how leftovers are found
# Big enough that a checkpoint (~5.6 MB) takes tens of ms to write, small enough to train ~8 steps/s on 2 cores.
MODEL = {"dim": 128, "layers": 2, "heads": 4, "context": 32}
SMALL = {"dim": 32, "layers": 1, "heads": 2, "context": 32}
PR_SET_CHILD_SUBREAPER = 36


@dataclasses.dataclass
class FaultResult:
    """One row of the campaign table."""

    fault: str
    count: int = 0
    survived: int = 0
    checkpoints_lost: int = 0
    orphans: int = 0
    notes: list[str] = dataclasses.field(default_factory=list)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def note(self, text: str) -> None:
        self.notes.append(text)

    def ok(self) -> bool:
        return self.count > 0 and self.survived == self.count and not self.checkpoints_lost and not self.orphans

    def as_json(self) -> dict[str, Any]:
        return {"fault": self.fault, "count": self.count, "survived": self.survived,
                "checkpoints_lost": self.checkpoints_lost, "orphans": self.orphans, "notes": "; ".join(self.notes)}


@dataclasses.dataclass
class Area:
    """The private directories of one fault: run dir (0700, short for ipc paths), state, config."""

    root: Path

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    def job_dir(self, job: str) -> Path:
        return self.state_dir / "jobs" / job

    def checkpoints(self, job: str) -> Path:
        return self.job_dir(job) / "checkpoints"

    def config(self, jobs: dict[str, dict[str, Any]], **daemon: Any) -> Path:
        keys = {"run_dir": str(self.run_dir), "state_dir": str(self.state_dir), "heartbeat_interval": 0.5,
                **daemon}
        return write_config(self.root / "mlxsup.toml", keys, jobs)

    def history(self, job: str) -> list[dict[str, Any]]:
        from supervisor.daemon.history import read_history

        return read_history(self.job_dir(job) / "history.jsonl")


class Workspace:
    """A short private directory under /tmp holding one Area per fault; removed at the end."""

    def __init__(self, keep: bool = False) -> None:
        self.root = Path(f"/tmp/mlxfa-{secrets.token_hex(3)}")
        self.root.mkdir(mode=0o700)
        self.keep = keep

    @property
    def mark(self) -> str:
        """Set in every process the campaign starts (and inherited by workers): how leftovers are found."""
        return str(self.root)

    def area(self, name: str) -> Area:
        root = self.root / name
        root.mkdir(mode=0o700)
        (root / "run").mkdir(mode=0o700)
        return Area(root)

    def close(self) -> None:
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)


class Group:
    """A child process leading its own session; ``kill`` signals the whole group and reaps the leader."""

    def __init__(self, argv: list[str], log: Path | None = None, mark: str = "",
                 env: dict[str, str] | None = None, stdout: int | IO[bytes] | None = None) -> None:
        full_env = {**os.environ, **(env or {})}
        if mark:
            full_env[MARK_ENV] = mark
        self._log: IO[bytes] | None = open(log, "ab") if log is not None else None  # noqa: SIM115
        out = self._log if self._log is not None else (stdout if stdout is not None else subprocess.DEVNULL)
        self.popen = subprocess.Popen(argv, env=full_env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out,
                                      stderr=self._log or subprocess.DEVNULL, start_new_session=True)
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait(self, timeout: float) -> int | None:
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self, signum: int = signal.SIGKILL, timeout: float = 10.0) -> int | None:
        """Signal the group (the leader may already be gone) and reap the leader."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signum)
        code = self.wait(timeout)
        if self._log is not None:
            self._log.close()
            self._log = None
        return code


@contextlib.contextmanager
def group(argv: list[str], log: Path | None = None, mark: str = "", env: dict[str, str] | None = None,
          ) -> Iterator[Group]:
    """A Group that is SIGKILLed by process group when the block ends, however it ends."""
    proc = Group(argv, log, mark, env)
    try:
        yield proc
    finally:
        proc.kill()


def mlxsupd(*args: str) -> list[str]:
    return [sys.executable, "-m", "supervisor.cli.mlxsupd", *args]


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` seconds pass; bounded in count and time."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / max(interval, 0.001)) + 2):
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return predicate()


def set_subreaper() -> bool:
    """Become the reaper of orphaned descendants (Linux), so an orphaned worker's exit status is ours to see."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (exited, or a zombie waiting to be reaped)."""
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def reap(pid: int) -> int | None:
    """Reap ``pid`` if it is our (adopted) child and has exited; its exit status, else None. Never blocks."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    if done == 0:
        return None
    return os.waitstatus_to_exitcode(status)


def group_alive(pgid: int) -> bool:
    """Whether any process is left in process group ``pgid`` (zombies of ours are reaped first)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return any(p.status() != psutil.STATUS_ZOMBIE for p in _group_members(pgid))


def _group_members(pgid: int) -> list[psutil.Process]:
    members = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(proc.pid) == pgid:
                members.append(proc)
    return members


def marked(mark: str) -> list[psutil.Process]:
    """Live (non-zombie) processes started under this campaign's mark, other than us."""
    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        with contextlib.suppress(psutil.Error, OSError):
            env = proc.environ()
            ours = mark in env.get(MARK_ENV, "") or mark in env.get("MLXSUP_CHECKPOINT_DIR", "")
            if ours and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
    return found


def sweep_orphans(mark: str, wait: float = 5.0) -> int:
    """Count the processes of ``mark`` still alive after ``wait`` seconds, kill their groups, reap ours."""
    wait_until(lambda: not marked(mark), wait, 0.1)
    leftovers = marked(mark)
    for proc in leftovers:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(os.getpgid(proc.pid), signal.SIGKILL)
        with contextlib.suppress(psutil.Error):
            proc.kill()
    for proc in leftovers:
        reap(proc.pid)
    return len(leftovers)


def worker_of(daemon_pid: int) -> psutil.Process | None:
    """The daemon's worker child (``python -m worker``), if it has one now."""
    try:
        children = psutil.Process(daemon_pid).children()
    except psutil.NoSuchProcess:
        return None
    for child in children:
        with contextlib.suppress(psutil.Error):
            if "worker" in child.cmdline() and child.status() != psutil.STATUS_ZOMBIE:
                return child
    return None


def states(history: list[dict[str, Any]]) -> list[str]:
    return [e["new"] for e in history if e.get("event") == "state"]


def reap_all(limit: int = 1000) -> int:
    """Reap exited children we adopted as subreaper (call only when no Popen of ours is still unreaped)."""
    reaped = 0
    for _ in range(limit):
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        reaped += 1
    return reaped


def start_daemon(area: Area, config: Path, mark: str, log_name: str = "daemon.log") -> Group:
    """A service-mode daemon on ``config`` that answers on its control socket (killed if it never does)."""
    daemon = Group(mlxsupd("-c", str(config), "--log-format", "json"), area.root / log_name, mark)
    # 60 s: a loaded 2-core machine can take tens of seconds to start a Python process and bind its sockets.
    answered = wait_until(lambda: answers(area.run_dir, 1.0) or not daemon.alive(), 60, 0.05)
    if not daemon.alive():
        raise RuntimeError(f"daemon exited at start; see {area.root / log_name}")
    if not answered:
        daemon.kill()
        raise RuntimeError(f"daemon did not answer within 60 s; see {area.root / log_name}")
    return daemon
