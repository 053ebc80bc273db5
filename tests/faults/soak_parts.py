"""The soak's parts: its jobs' config, the daemon probe, disk use and its bound, start time, reconnecting clients.

``python -m tests.faults.soak_parts clients CONFIG OUT`` is the client loop the soak runs beside the daemon: a
control client that connects, asks ``status`` and closes, and an event subscriber that connects, reads a while
and closes, over and over until SIGTERM; it writes its counts to OUT (JSON) as it goes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from tests.faults.common import ROOT, Area, Group, mlxsupd, wait_until
from tests.faults.wire import Control, answers

SDK_WORKER = ROOT / "tests" / "workers" / "sdk_leak.py"
PLAIN_WORKER = ROOT / "tests" / "workers" / "plain_leak.py"
ROTATING_PER_JOB = 4  # history.jsonl, telemetry.jsonl, stdout.log, stderr.log
ROTATING_DAEMON = 2  # mlxsupd.log, audit.jsonl
SLACK_BYTES = 2 * 2**20  # directory blocks, checkpoints of a 4x4 model, a line past the rotation size per file


@dataclasses.dataclass(frozen=True)
class Shape:
    """The soak's daemon: how many fast-leaking jobs of each kind, and its rotation settings."""

    sdk_jobs: int = 2
    guard_jobs: int = 2
    log_max_bytes: int = 2**20
    log_keep: int = 2
    sample_interval: float = 0.02
    guard_mib: int = 16  # each guard-only step's leak (the kernel's page zeroing is most of a guard life's CPU)
    guard_budget: str = "120MiB"


def jobs_config(shape: Shape) -> dict[str, dict[str, Any]]:
    """SDK jobs leaking 8 MiB per 10 ms step (a recycle every half second or so: leak_predicted) and guard-only
    jobs leaking ``guard_mib`` per 5 ms (SIGTERM or SIGKILL at their budget, started over). A guard-only command
    stops growing after 16 steps and exits 10 s later: it knows nothing of its daemon, and one is SIGKILLed
    halfway."""
    jobs: dict[str, dict[str, Any]] = {}
    for index in range(shape.sdk_jobs):
        jobs[f"sdk{index}"] = {
            "command": [sys.executable, str(SDK_WORKER), "100000000", "8", "--seconds", "0.01"], "budget": "300MiB",
            "min_steps_per_life": 1, "checkpoint_every": 0, "keep_checkpoints": 2,
            "max_attempts_without_progress": 1000, "startup_timeout": 60.0}
    for index in range(shape.guard_jobs):
        jobs[f"guard{index}"] = {
            "command": [sys.executable, "-S", str(PLAIN_WORKER), "16", str(shape.guard_mib), "--seconds", "0.005",
                        "--hold", "10"],
            "budget": shape.guard_budget, "sdk": False, "max_attempts_without_progress": 100_000_000, "kill_grace": 1.0}
    return jobs


def write_soak_config(area: Area, shape: Shape, state_dir: Path | None = None, run_dir: Path | None = None,
                      ) -> Path:
    state = state_dir or area.state_dir
    return area.config(jobs_config(shape), state_dir=str(state), run_dir=str(run_dir or area.run_dir),
                       log_file=str(state / "logs" / "mlxsupd.log"), log_max_bytes=str(shape.log_max_bytes),
                       log_keep=shape.log_keep, sample_interval=shape.sample_interval,
                       calm_sample_interval=shape.sample_interval)


def disk_bound(shape: Shape) -> int:
    """The most the state dir may hold: every rotating file at its size limit plus its kept old files."""
    files = ROTATING_DAEMON + ROTATING_PER_JOB * (shape.sdk_jobs + shape.guard_jobs)
    return files * (shape.log_keep + 1) * shape.log_max_bytes + SLACK_BYTES


def disk_used(root: Path) -> int:
    """Bytes allocated under ``root`` (like du): files and directories."""
    total = 0
    for path in [root, *root.rglob("*")]:
        with contextlib.suppress(OSError):
            total += path.lstat().st_blocks * 512
    return total


class Probe:
    """The daemon process's RSS, open fds, threads and CPU seconds."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)

    def sample(self, times: int = 10, gap: float = 0.05) -> dict[str, Any]:
        """fds and threads: the fewest of ``times`` looks ``gap`` apart (a spawn holds a few pipes and files
        for a moment); RSS and CPU seconds: the last look."""
        fds, threads = [], []
        for _ in range(times):
            with self.proc.oneshot():
                fds.append(self.proc.num_fds())
                threads.append(self.proc.num_threads())
                cpu, rss = self.proc.cpu_times(), self.proc.memory_info().rss
            time.sleep(gap)
        return {"rss_bytes": rss, "fds": min(fds), "threads": min(threads),
                "cpu_seconds": round(cpu.user + cpu.system, 3)}


def restarts(client: Control) -> int | None:
    """Restarts of every job under this daemon process (None when it did not answer)."""
    reply = client.request("status", timeout=5.0)
    if reply is None or not reply.get("ok"):
        return None
    return sum(int(row.get("restarts", 0)) for row in reply["result"]["jobs"])


def start_seconds(area: Area, shape: Shape, mark: str, scratch: str) -> float | None:
    """Seconds a new daemon takes to answer on a copy of the state dir (None: it did not within 60 s).

    The copy's jobs resume (their history says they ran); the new daemon is told to shut down at once."""
    root = area.root / scratch
    shutil.rmtree(root, ignore_errors=True)
    (root / "run").mkdir(parents=True, mode=0o700)
    copy_live_tree(area.state_dir, root / "state")
    copy = Area(root)
    config = write_soak_config(copy, shape)
    started = time.monotonic()
    daemon = Group(mlxsupd("-c", str(config), "--log-format", "json"), root / "daemon.log", mark)
    try:
        if not wait_until(lambda: answers(copy.run_dir, 1.0) or not daemon.alive(), 60, 0.02):
            return None
        took = time.monotonic() - started
        daemon.kill(signal.SIGTERM, timeout=30)
        return round(took, 3) if daemon.popen.returncode is not None else took
    finally:
        daemon.kill()
        shutil.rmtree(root, ignore_errors=True)


def copy_live_tree(src: Path, dst: Path) -> None:
    """Copy a directory a running daemon writes to: a file or directory gone between the listing and its copy
    (a checkpoint's temp directory renamed, a rotated log) is left out, as if copied a moment later."""
    for dirpath, dirnames, filenames in os.walk(src):
        here = Path(dirpath)
        target = dst / here.relative_to(src)
        target.mkdir(parents=True, exist_ok=True)
        links = [name for name in dirnames if (here / name).is_symlink()]
        for name in [*filenames, *links]:
            with contextlib.suppress(FileNotFoundError):
                shutil.copy2(here / name, target / name, follow_symlinks=False)


# -- the client loop (a process of its own) ---------------------------------------------------------------

def client_loop(config: Path, out: Path) -> int:
    """Reconnect a control client and an event subscriber until SIGTERM; counts in ``out``."""
    from protocol.control import ControlError
    from supervisor.config import load_config
    from supervisor.control.client import ControlClient

    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))
    loaded = load_config(config)
    run_dir = Path(loaded.run_dir)
    endpoint, events = f"ipc://{run_dir / 'control.sock'}", f"ipc://{run_dir / 'events.sock'}"
    counts = {"control_connections": 0, "control_failures": 0, "subscriptions": 0, "events": 0}
    for cycle in range(10_000_000):
        if stop:
            break
        client = ControlClient(endpoint, timeout=2.0)
        try:
            counts["control_connections"] += 1
            client.call("status")
            for _, _event in client.subscribe(events, ["job."], timeout=0.3):
                counts["events"] += 1
                if counts["events"] % 200 == 0 or stop:
                    break
            counts["subscriptions"] += 1
        except ControlError:
            counts["control_failures"] += 1
            time.sleep(0.2)
        finally:
            client.close()
        if cycle % 20 == 0:
            _write(out, counts)
    _write(out, counts)
    return 0


def _write(out: Path, counts: dict[str, int]) -> None:
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(counts))
    os.replace(tmp, out)


def tail_loop_argv(config: Path, job: str) -> list[str]:
    """A real ``mlxsupctl tail -f`` of a job's telemetry for a few seconds (the soak starts it over and over)."""
    return [sys.executable, "-m", "supervisor.cli.mlxsupctl", "-c", str(config), "tail", "-f", job, "telemetry",
            "--seconds", "4"]


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "clients":
        print("usage: python -m tests.faults.soak_parts clients CONFIG OUT", file=sys.stderr)
        sys.exit(2)
    sys.exit(client_loop(Path(sys.argv[2]), Path(sys.argv[3])))
