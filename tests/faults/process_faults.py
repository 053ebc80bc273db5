"""A hung worker (SIGSTOP) and PID reuse.

Hung: the daemon must notice the missing telemetry within ``hang_timeout``, kill the stopped worker (SIGTERM
stays pending on a stopped process, so SIGKILL after the grace period) and restart it from its checkpoint.

PID reuse: ``RealProcess`` signals a worker's group only while the leader is unreaped. With
``/proc/sys/kernel/ns_last_pid`` (root, Linux) the campaign forces an unrelated session leader onto the reaped
worker's pid and checks that ``signal_group`` refuses and the stranger survives. A second case hands the pid to
a stranger the instant the leader is reaped, wherever that happens, so a group sweep that runs after the reap
(inside ``RealProcess.poll``) would hit the stranger.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from protocol.checkpoints import latest_step
from supervisor.daemon.system import RealProcess
from tests.faults.common import (
    SMALL,
    Area,
    FaultResult,
    Workspace,
    gone,
    start_daemon,
    sweep_orphans,
    wait_until,
)
from tests.faults.wire import Control

NS_LAST_PID = Path("/proc/sys/kernel/ns_last_pid")
HANG_TIMEOUT = 2.0
KILL_GRACE = 1.0


def hung_cycle(client: Control, area: Area) -> tuple[bool, str]:
    """Stop the running worker; wait for a kill and a new RUNNING worker. (survived, note)."""
    row: dict[str, Any] = {}
    pid = 0

    def running() -> bool:
        row.update(client.job("j"))
        return row["state"] == "RUNNING" and row["pid"] not in (None, pid) and int(row["step"]) > 0

    if not wait_until(running, 30, 0.05):
        return False, "no running worker"
    pid = int(row["pid"])
    time.sleep(0.3)
    psutil.Process(pid).send_signal(signal.SIGSTOP)
    stopped_at = time.monotonic()
    newest = latest_step(area.checkpoints("j")) or 0
    if not wait_until(lambda: gone(pid), HANG_TIMEOUT + KILL_GRACE + 10, 0.05):
        return False, f"stopped worker {pid} was not killed"
    detected = time.monotonic() - stopped_at
    if not wait_until(running, 30, 0.05):
        return False, f"no restart after killing {pid}"
    spawn = next((e for e in area.history("j") if e.get("event") == "spawn" and e.get("pid") == row["pid"]), {})
    if spawn.get("from_checkpoint") != newest:
        return False, f"restart resumed from {spawn.get('from_checkpoint')}, newest was {newest}"
    return True, f"{detected:.1f}s"


def hang(ws: Workspace, stops: int) -> FaultResult:
    """``stops`` SIGSTOPs of the worker under a service-mode daemon with a 2 s hang timeout."""
    result = FaultResult("worker SIGSTOP (hung)")
    area = ws.area("hang")
    config = area.config({"j": {"hang_timeout": HANG_TIMEOUT, "kill_grace": KILL_GRACE, "backoff_initial": 0.1,
                                "checkpoint_every": 10, "budget": "2GiB", "train": {**SMALL, "steps": 1_000_000}}})
    daemon = start_daemon(area, config, ws.mark)
    detections: list[str] = []
    try:
        client = Control.ipc(area.run_dir)
        try:
            for _ in range(stops):
                ok, note = hung_cycle(client, area)
                result.count += 1
                result.survived += ok
                detections.append(note)
            client.result("shutdown")
        finally:
            client.close()
        result.note(f"daemon exit {daemon.wait(60)}")
        history = area.history("j")
        kills = [e for e in history if e.get("event") == "kill" and "hung" in str(e.get("reason"))]
        codes = [e.get("code") for e in history if e.get("event") == "exit"]
        result.note(f"stop→killed in {', '.join(detections)} (hang_timeout {HANG_TIMEOUT}s + grace {KILL_GRACE}s); "
                    f"{len(kills)} 'hung' kills in history, exit codes {codes}")
        if len(kills) != result.count:
            result.survived = min(result.survived, len(kills))
    finally:
        daemon.kill()
        result.orphans = sweep_orphans(ws.mark, 5)
    return result


def spawn_on_pid(pid: int, attempts: int = 50) -> subprocess.Popen[bytes] | None:
    """Start ``sleep`` as a session leader on exactly ``pid`` (via ns_last_pid), or None if that fails."""
    for _ in range(attempts):
        try:
            NS_LAST_PID.write_text(str(pid - 1))
        except OSError:
            return None
        stranger = subprocess.Popen(["sleep", "30"], start_new_session=True)
        if stranger.pid == pid:
            return stranger
        stranger.kill()
        stranger.wait(timeout=5)
    return None


class RacyPopen(subprocess.Popen[bytes]):
    """A Popen that lets a stranger take the leader's pid the moment the leader is reaped (poll or wait).

    ``_handle_exitstatus`` is where Popen records the status right after ``waitpid`` reaped the leader; the pid
    is free from then on, so this models the worst case of pid reuse: immediately after the reap.
    """

    stranger: subprocess.Popen[bytes] | None = None

    def _handle_exitstatus(self, *args: Any, **kwargs: Any) -> None:
        super()._handle_exitstatus(*args, **kwargs)  # type: ignore[misc]
        if self.stranger is None:
            self.stranger = spawn_on_pid(self.pid)


def stranger_survives(stranger: subprocess.Popen[bytes]) -> bool:
    time.sleep(0.3)
    return stranger.poll() is None


def reuse_after_reap(result: FaultResult) -> None:
    """A reaped worker's pid goes to a stranger: signal_group must refuse and the stranger must live."""
    worker = RealProcess(subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True))
    wait_until(lambda: worker.poll() is not None, 10, 0.01)
    stranger = spawn_on_pid(worker.pid)
    if stranger is None:
        result.note("/proc/sys/kernel/ns_last_pid unavailable (Linux, root only): pid reuse not forced")
        stranger = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        reachable = _reachable(worker.pid)
        refused = worker.signal_group(signal.SIGKILL) is False
        lives = stranger_survives(stranger)
        result.count += 1
        result.survived += refused and lives
        result.note(f"after reap: stranger on pid {stranger.pid} (same pid: {stranger.pid == worker.pid}, "
                    f"a naive killpg would reach it: {reachable}); signal_group refused: {refused}; survived: {lives}")
    finally:
        stranger.kill()
        stranger.wait(timeout=5)


def reuse_inside_poll(result: FaultResult) -> None:
    """The reuse lands between poll()'s reap and its sweep: the sweep must not kill the stranger."""
    racy = RacyPopen([sys.executable, "-c", "pass"], start_new_session=True)
    worker = RealProcess(racy)
    try:
        wait_until(lambda: worker.poll() is not None, 10, 0.01)
        stranger = racy.stranger
        if stranger is None:
            result.note("reap→sweep window: pid reuse could not be forced")
            return
        lives = stranger_survives(stranger)
        result.count += 1
        result.survived += lives
        result.note(f"reuse inside poll() between reap and sweep: stranger survived: {lives}"
                    + ("" if lives else " (BUG: RealProcess.poll sweeps the group after reaping the leader)"))
    finally:
        if racy.stranger is not None:
            racy.stranger.kill()
            racy.stranger.wait(timeout=5)


def _reachable(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def pid_reuse() -> FaultResult:
    """Both PID-reuse cases (Linux, root for ns_last_pid)."""
    result = FaultResult("PID reuse")
    for case in (reuse_after_reap, reuse_inside_poll):
        try:
            case(result)
        except OSError as exc:
            result.note(f"{case.__name__}: {exc}")
    return result
