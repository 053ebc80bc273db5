"""SIGKILL the worker at random moments, many of them inside checkpoint writes; nothing may be lost.

One ``mlxsupd run`` supervises one job that checkpoints every step. The campaign kills whichever worker the
daemon has at random delays: during start-up, mid-step, or while a ``.tmp-ckpt-*`` directory shows a save in
flight. After each kill it checks that the newest checkpoint on disk loads; afterwards that every restart
resumed from the newest complete checkpoint that existed when its predecessor died (a resume point behind it
is a lost checkpoint), and that the final weights equal bit for bit those of an uninterrupted standalone run.
"""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from protocol.checkpoints import latest_step
from tests.faults.common import (
    MODEL,
    Area,
    FaultResult,
    Group,
    Workspace,
    gone,
    json_lines,
    mlxsupd,
    sweep_orphans,
    wait_until,
    worker_of,
)

STEPS_PER_KILL = 3  # job length: enough steps that the kills run out before the training does


@dataclasses.dataclass
class Kill:
    """What one kill hit and what was on disk right after it."""

    pid: int
    mode: str
    during_write: bool
    newest_by_name: int
    newest_loadable: int


def train_args(steps: int) -> list[str]:
    return ["--steps", str(steps), *[f"--{k}={v}" for k, v in MODEL.items()], "--seed", "0"]


def newest_loadable(directory: Path) -> int:
    """Step of the checkpoint ``load_latest`` returns (0: none); it verifies every checksum."""
    from worker.checkpoint import load_latest

    loaded = load_latest(directory)
    return loaded.step if loaded is not None else 0


def scratch_of(directory: Path, pid: int) -> list[str]:
    """Temp checkpoint dirs of ``pid`` (a save in flight, or abandoned by a killed writer)."""
    try:
        return [e.name for e in os.scandir(directory) if e.name.startswith(".tmp-ckpt-") and f"-{pid}-" in e.name]
    except FileNotFoundError:
        return []


def wait_for_saves(directory: Path, pid: int, count: int, timeout: float) -> bool:
    """Poll (1 ms) until ``count`` distinct saves of ``pid`` have been seen in flight; the last is in flight."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout * 2000)):
        seen.update(scratch_of(directory, pid))
        if len(seen) >= count or time.monotonic() > deadline or gone(pid):
            return len(seen) >= count
        time.sleep(0.001)
    return False


def aim(mode: str, directory: Path, proc: psutil.Process, rng: random.Random) -> str:
    """Wait for the moment ``mode`` aims at; returns the mode actually used."""
    start = latest_step(directory) or 0
    if mode == "startup":
        time.sleep(rng.uniform(0.0, 0.15))
        return mode
    if mode == "write":
        if wait_for_saves(directory, proc.pid, rng.randint(1, 3), 20):
            time.sleep(rng.uniform(0.0, 0.012))
            return mode
        return "write-missed"
    wait_until(lambda: (latest_step(directory) or 0) > start or gone(proc.pid), 20, 0.005)
    time.sleep(rng.uniform(0.0, 0.5))
    return mode


def kill_one(area: Area, daemon: Group, previous: psutil.Process | None, mode: str, rng: random.Random) -> Kill | None:
    """Find the daemon's current worker, wait for the moment, SIGKILL it and inspect the disk."""
    directory = area.checkpoints("j")
    current: list[psutil.Process] = []

    def found() -> bool:
        worker = worker_of(daemon.pid)
        if worker is not None and worker != previous:
            current[:] = [worker]
        return bool(current) or not daemon.alive()

    if not wait_until(found, 30, 0.002) or not current:
        return None
    proc = current[0]
    used = aim(mode, directory, proc, rng)
    try:
        proc.send_signal(signal.SIGKILL)  # psutil checks pid and start time: never a recycled pid
    except psutil.NoSuchProcess:
        return None
    wait_until(lambda: gone(proc.pid), 5, 0.001)
    during = bool(scratch_of(directory, proc.pid))
    by_name = latest_step(directory) or 0
    return Kill(proc.pid, used, during, by_name, newest_loadable(directory))


def choose_mode(rng: random.Random, step: int, expected: float) -> str:
    """Mostly random moments and in-flight saves; start-up kills (no progress) when ahead of schedule."""
    if step > expected + 10:
        return "startup"
    return rng.choices(["random", "write", "startup"], weights=[45, 40, 15])[0]


def campaign(area: Area, daemon: Group, kills: int, steps: int, rng: random.Random,
             deadline: float) -> list[Kill]:
    """Kill ``kills`` workers (fewer if the time budget or the job runs out)."""
    done: list[Kill] = []
    previous: psutil.Process | None = None
    for index in range(kills):
        step = latest_step(area.checkpoints("j")) or 0
        if time.monotonic() > deadline or step >= steps - 10 or not daemon.alive():
            break
        kill = kill_one(area, daemon, previous, choose_mode(rng, step, index * (steps - 40) / kills), rng)
        if kill is None:
            break
        previous = psutil.Process(kill.pid) if not gone(kill.pid) else None
        done.append(kill)
    return done


def resume_points(area: Area, log: Path) -> tuple[list[dict[str, Any]], dict[int, int]]:
    """Spawn events (pid, from_checkpoint) in order, and each pid's hello start_step from the daemon log."""
    spawns = [e for e in area.history("j") if e.get("event") == "spawn"]
    hellos = {int(r["pid"]): int(r["start_step"]) for r in json_lines(log) if r.get("event") == "worker_hello"}
    return spawns, hellos


def judge(result: FaultResult, kills: list[Kill], spawns: list[dict[str, Any]], hellos: dict[int, int]) -> None:
    """Count survivals and lost checkpoints: each next life must resume at the newest loadable checkpoint."""
    order = [int(s["pid"]) for s in spawns]
    damaged = 0
    for kill in kills:
        if kill.newest_loadable != kill.newest_by_name:
            damaged += 1
            result.note(f"newest checkpoint {kill.newest_by_name} unloadable after killing pid {kill.pid}")
        if kill.pid not in order or order.index(kill.pid) + 1 >= len(spawns):
            result.note(f"no restart found after killing pid {kill.pid}")
            continue
        after = spawns[order.index(kill.pid) + 1]
        resumed = hellos.get(int(after["pid"]), int(after["from_checkpoint"]))
        if resumed < kill.newest_loadable:
            result.checkpoints_lost += 1
            result.note(f"pid {after['pid']} resumed at {resumed} < newest {kill.newest_loadable}")
        elif resumed == kill.newest_loadable == int(after["from_checkpoint"]) == kill.newest_by_name:
            result.survived += 1
        else:
            result.note(f"pid {after['pid']}: resumed {resumed}, from_checkpoint {after['from_checkpoint']}, "
                        f"newest {kill.newest_loadable}")
    result.extra["damaged_after_kill"] = damaged


def weights_equal(left: Path, right: Path) -> tuple[bool, str]:
    """Whether the newest checkpoints of two directories hold bitwise-identical arrays (model and optimizer)."""
    import numpy as np

    from worker.checkpoint import load_latest

    a, b = load_latest(left), load_latest(right)
    if a is None or b is None:
        return False, f"missing checkpoint ({left}: {a is not None}, {right}: {b is not None})"
    if a.step != b.step:
        return False, f"steps differ: {a.step} vs {b.step}"
    for kind in ("model", "optimizer"):
        x, y = getattr(a, kind), getattr(b, kind)
        if set(x) != set(y):
            return False, f"{kind} keys differ"
        for key in x:
            if x[key].dtype != y[key].dtype or np.asarray(x[key]).tobytes() != np.asarray(y[key]).tobytes():
                return False, f"{kind}.{key} differs"
    return True, f"{len(a.model)} model + {len(a.optimizer)} optimizer arrays equal at step {a.step}"


def run(ws: Workspace, kills: int, seed: int, budget: float) -> FaultResult:
    """The whole fault: daemon, reference run, kills, verdicts."""
    rng = random.Random(seed)
    result = FaultResult("worker SIGKILL")
    area = ws.area("worker-kill")
    steps = STEPS_PER_KILL * kills + 30
    job = {"checkpoint_every": 1, "keep_checkpoints": 3, "backoff_initial": 0.05, "backoff_max": 0.1,
           "max_attempts_without_progress": 100_000, "startup_timeout": 60.0, "hang_timeout": 30.0,
           "budget": "4GiB", "train": {**MODEL, "steps": steps, "seed": 0}}
    config = area.config({"j": job})
    log = area.root / "daemon.log"
    reference_dir = area.root / "reference"
    reference = Group([sys.executable, "-m", "worker", "--checkpoint-dir", str(reference_dir), *train_args(steps)],
                      area.root / "reference.log", ws.mark)
    daemon = Group(mlxsupd("run", "-c", str(config), "j", "--summary", str(area.root / "summary.json"),
                           "--log-format", "json"), log, ws.mark)
    try:
        done = campaign(area, daemon, kills, steps, rng, time.monotonic() + budget)
        code = daemon.wait(steps / 3 + 120)
        reference.wait(steps / 3 + 120)
        result.count = len(done)
        judge(result, done, *resume_points(area, log))
        equal, detail = weights_equal(area.checkpoints("j"), reference_dir)
        result.extra["final_weights_equal"] = equal
        modes = {m: sum(k.mode == m for k in done) for m in ("random", "write", "startup", "write-missed")}
        result.note(f"{sum(k.during_write for k in done)} kills during a checkpoint write (.tmp-ckpt-* present)")
        result.note("modes " + ", ".join(f"{m} {n}" for m, n in modes.items() if n))
        result.note(f"daemon exit {code}; {steps} steps; final weights {'==' if equal else '!='} "
                    f"uninterrupted run ({detail})")
        if code != 0 or not equal:
            result.survived = min(result.survived, result.count - 1)
    finally:
        daemon.kill()
        reference.kill()
        result.orphans = sweep_orphans(ws.mark, 5)
    return result
