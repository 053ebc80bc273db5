"""SIGKILL the daemon mid-run: its orphaned worker checkpoints and exits by itself, and a new daemon resumes.

The job is started once over the control socket and never checkpoints periodically, so every step it keeps
was saved by a worker that noticed its daemon was gone. After each kill: the worker must exit (status 75)
within 5 s, nothing may be left in its process group, the newest checkpoint must load and hold at least the
last step the daemon reported; the next daemon must resume the job from exactly that checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import time

from protocol.checkpoints import latest_step
from tests.faults.common import (
    SMALL,
    Area,
    FaultResult,
    Group,
    Workspace,
    gone,
    group_alive,
    json_lines,
    reap,
    start_daemon,
    sweep_orphans,
    wait_until,
)
from tests.faults.wire import Control

ORPHAN_LIMIT = 5.0  # seconds the orphaned worker may take to checkpoint and exit


@dataclasses.dataclass
class Cycle:
    """One daemon life ended by SIGKILL, and what its orphan did."""

    worker: int
    reported_step: int
    exit_code: int | None
    exit_seconds: float
    group_left: bool
    newest: int
    loadable: int




def running_pid(client: Control, previous: int | None) -> int | None:
    """The pid of the job's worker once it is RUNNING under this daemon (a new pid), else None."""
    holder: list[int] = []

    def check() -> bool:
        row = client.job("j")
        if row["state"] == "RUNNING" and row["pid"] and row["pid"] != previous:
            holder.append(int(row["pid"]))
        return bool(holder)

    wait_until(check, 30, 0.05)
    return holder[0] if holder else None


def kill_daemon(area: Area, daemon: Group, client: Control, worker: int, rng: random.Random) -> Cycle:
    """Wait a random moment, SIGKILL the daemon alone, then watch its orphan leave."""
    time.sleep(rng.uniform(0.0, 1.5))
    reported = int(client.job("j")["step"])
    os.kill(daemon.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    daemon.wait(10)
    codes: list[int | None] = []

    def left() -> bool:
        code = reap(worker)
        if code is not None:
            codes.append(code)
        return bool(codes) or gone(worker)

    wait_until(left, ORPHAN_LIMIT + 5, 0.01)
    seconds = time.monotonic() - killed_at
    wait_until(lambda: not group_alive(worker), 2, 0.05)
    from tests.faults.worker_kills import newest_loadable

    directory = area.checkpoints("j")
    return Cycle(worker, reported, codes[0] if codes else None, seconds, group_alive(worker),
                 latest_step(directory) or 0, newest_loadable(directory))


def resumed_at(area: Area, index: int, pid: int) -> tuple[int, int]:
    """(from_checkpoint of the spawn of ``pid``, start_step of its hello in daemon log ``index``)."""
    spawn = next((e for e in area.history("j") if e.get("event") == "spawn" and e.get("pid") == pid), {})
    hello = next((r for r in json_lines(area.root / f"daemon-{index}.log")
                  if r.get("event") == "worker_hello" and r.get("pid") == pid), {})
    return int(spawn.get("from_checkpoint", -1)), int(hello.get("start_step", -1))


def judge(result: FaultResult, cycle: Cycle, resumed: tuple[int, int]) -> None:
    """One kill survived: quick clean exit with a checkpoint that the next daemon resumed from exactly."""
    problems = []
    if cycle.exit_code not in (None, 75):
        problems.append(f"exit {cycle.exit_code}")
    if cycle.exit_seconds > ORPHAN_LIMIT:
        problems.append(f"orphan took {cycle.exit_seconds:.1f}s")
    if cycle.group_left:
        result.orphans += 1
        problems.append("process group survived")
    if cycle.loadable != cycle.newest:
        problems.append(f"newest {cycle.newest} unloadable")
    if cycle.newest < cycle.reported_step or min(resumed) < cycle.newest:
        result.checkpoints_lost += 1
        problems.append(f"reported {cycle.reported_step}, saved {cycle.newest}, resumed {resumed}")
    if problems:
        result.note(f"worker {cycle.worker}: " + ", ".join(problems))
    else:
        result.survived += 1


def run(ws: Workspace, kills: int, seed: int, budget: float) -> FaultResult:
    """``kills`` daemon lives, each ended by SIGKILL; one more daemon resumes and shuts down cleanly."""
    rng = random.Random(seed)
    result = FaultResult("daemon SIGKILL")
    area = ws.area("daemon-kill")
    config = area.config({"j": {"autostart": False, "checkpoint_every": 0, "backoff_initial": 0.05,
                                "budget": "2GiB", "train": {**SMALL, "steps": 1_000_000}}})
    daemon: Group | None = None
    deadline = time.monotonic() + budget
    seconds: list[float] = []
    worker: int | None = None
    cycle: Cycle | None = None
    try:
        for index in range(kills + 1):
            daemon = start_daemon(area, config, ws.mark, f"daemon-{index}.log")
            client = Control.ipc(area.run_dir)
            try:
                if index == 0:
                    client.result("start", {"job": "j"})
                pid = running_pid(client, worker)
                if pid is None:
                    result.note(f"daemon {index}: job not RUNNING within 30 s")
                    break
                if cycle is not None:
                    judge(result, cycle, resumed_at(area, index, pid))
                if index == kills or time.monotonic() > deadline:
                    result.extra["shutdown_reply"] = client.result("shutdown")
                    result.note(f"last daemon shut down with exit {daemon.wait(60)}")
                    break
                worker = pid
                cycle = kill_daemon(area, daemon, client, pid, rng)
                result.count += 1
                seconds.append(cycle.exit_seconds)
            finally:
                client.close()
        if seconds:
            result.note(f"orphan exit after {min(seconds):.2f}-{max(seconds):.2f}s (limit {ORPHAN_LIMIT:.0f}s)")
    finally:
        if daemon is not None:
            daemon.kill()
        result.orphans += sweep_orphans(ws.mark, 5)
    return result


def mid_step(ws: Workspace) -> FaultResult:
    """SIGKILL the daemon while its worker is deep inside a 30-second step: the SDK's watchdog must end the
    orphan within the orphan timeout (its last durable checkpoint stands), not at the step's end."""
    result = FaultResult("daemon SIGKILL mid-step")
    area = ws.area("daemon-kill-slow")
    config = area.config({"j": {"hang_timeout": 120.0, "checkpoint_every": 1,
                                "train": {**SMALL, "steps": 100, "step_sleep": 30.0}}})
    daemon = start_daemon(area, config, ws.mark, "daemon.log")
    client = Control.ipc(area.run_dir)
    try:
        pid = running_pid(client, None)
        if pid is None:
            result.note("job not RUNNING within 30 s")
            return result
        time.sleep(2.0)  # inside its first step
        os.kill(daemon.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        daemon.wait(10)
        wait_until(lambda: reap(pid) is not None or gone(pid), ORPHAN_LIMIT + 5, 0.01)
        seconds = time.monotonic() - killed_at
        result.count = 1
        left = not group_alive(pid)
        if seconds <= ORPHAN_LIMIT and left:
            result.survived = 1
        else:
            result.orphans += int(not left)
        result.note(f"orphan left {seconds:.2f}s after the daemon died, mid-step (limit {ORPHAN_LIMIT:.0f}s, "
                    "steps of 30 s)")
        result.extra["orphan_mid_step_seconds"] = round(seconds, 3)
    finally:
        client.close()
        daemon.kill()
        result.orphans += sweep_orphans(ws.mark, 5)
    return result

