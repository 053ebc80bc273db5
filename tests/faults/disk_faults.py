"""Disk faults: a checkpoint directory that fills up, and a newest checkpoint damaged while the job is stopped.

Disk full: the job's checkpoint_dir is an 8 MiB tmpfs that holds one ~5.6 MB checkpoint but not two. The
second save fails; the error must be reported, the first checkpoint must stay intact, and the job must not
spin: bounded restarts with a growing backoff, then FATAL after ``max_attempts_without_progress``.

Damaged checkpoint: between a stop and a start, the newest checkpoint is truncated, bit-flipped or loses its
metadata; the restarted worker must resume from the checkpoint before it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
from pathlib import Path
from typing import Any

from protocol.checkpoints import list_checkpoints
from tests.faults.common import (
    MODEL,
    SMALL,
    Area,
    FaultResult,
    Group,
    Workspace,
    json_lines,
    mlxsupd,
    start_daemon,
    states,
    sweep_orphans,
    wait_until,
)
from tests.faults.wire import Control

ATTEMPTS = 3
BACKOFF = 0.2


def mount_tmpfs(path: Path, size: str) -> str:
    """Mount a tmpfs of ``size`` on ``path``; '' on success, else why not."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, text=True, timeout=10, start_new_session=True)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    return "" if done.returncode == 0 else (done.stderr.strip() or f"mount exited {done.returncode}")


def unmount(path: Path) -> None:
    for argv in (["umount", str(path)], ["umount", "-l", str(path)]):
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            if subprocess.run(argv, capture_output=True, timeout=10, start_new_session=True).returncode == 0:
                return


def backoff_delays(history: list[dict[str, Any]]) -> list[float]:
    return [float(e.get("delay", 0)) for e in history if e.get("event") == "state" and e.get("new") == "BACKOFF"]


def observed_gaps(history: list[dict[str, Any]]) -> list[float]:
    """Seconds from each crash exit to the next spawn."""
    gaps, exit_time = [], None
    for event in history:
        if event.get("event") == "exit":
            exit_time = float(event["time"])
        elif event.get("event") == "spawn" and exit_time is not None:
            gaps.append(float(event["time"]) - exit_time)
            exit_time = None
    return gaps


def judge_disk_full(result: FaultResult, area: Area, mount: Path, code: int | None) -> None:
    from worker.checkpoint import load_latest

    history = area.history("j")
    stderr = (area.state_dir / "logs" / "jobs" / "j" / "stderr.log").read_text(errors="replace")
    reported = "No space left" in stderr or "cannot write checkpoint" in stderr
    spawns = sum(e.get("event") == "spawn" for e in history)
    delays, gaps = backoff_delays(history), observed_gaps(history)
    loaded = load_latest(mount)
    scratch = [p.name for p in mount.iterdir() if p.name.startswith(".")]
    fatal = states(history)[-1:] == ["FATAL"]
    growing = len(delays) >= 2 and all(b > a for a, b in itertools.pairwise(delays))
    honoured = all(g >= d * 0.9 for g, d in zip(gaps, delays, strict=False))
    result.count = 1
    result.survived = int(reported and fatal and spawns == ATTEMPTS + 1 and loaded is not None and not scratch
                          and honoured and growing)
    result.checkpoints_lost = int(loaded is None)
    result.note(f"mlxsupd run exit {code}; error in worker stderr: {reported}; {spawns} spawns, final "
                f"{states(history)[-1:]}; intact checkpoint step {loaded.step if loaded else None}; scratch left "
                f"{scratch}; backoff delays {delays}, observed gaps {[round(g, 2) for g in gaps]}")
    if not growing:
        result.note("BUG: backoff does not grow (Job._restart resets the crash count)")


def disk_full(ws: Workspace) -> FaultResult:
    """An 8 MiB tmpfs as the checkpoint dir; skipped with a note when mount is not possible."""
    result = FaultResult("disk full during checkpoint")
    area = ws.area("disk-full")
    mount = area.root / "tmpfs"
    problem = mount_tmpfs(mount, "8m")
    if problem:
        result.note(f"skipped: cannot mount a tmpfs ({problem})")
        return result
    daemon: Group | None = None
    try:
        config = area.config({"j": {"checkpoint_dir": str(mount), "checkpoint_every": 3, "keep_checkpoints": 3,
                                    "backoff_initial": BACKOFF, "backoff_max": 5.0, "budget": "2GiB",
                                    "max_attempts_without_progress": ATTEMPTS,
                                    "train": {**MODEL, "steps": 1000}}})
        daemon = Group(mlxsupd("run", "-c", str(config), "j", "--log-format", "json"), area.root / "daemon.log",
                       ws.mark)
        code = daemon.wait(120)
        judge_disk_full(result, area, mount, code)
    finally:
        if daemon is not None:
            daemon.kill()
        result.orphans = sweep_orphans(ws.mark, 5)
        unmount(mount)
    return result


def damage(checkpoint: Path, kind: str) -> None:
    """Truncate the model file, flip one bit of the optimizer file, or delete meta.json."""
    if kind == "truncated":
        target = checkpoint / "model.safetensors"
        os.truncate(target, target.stat().st_size // 2)
    elif kind == "bit-flipped":
        target = checkpoint / "optimizer.safetensors"
        with open(target, "r+b") as handle:
            handle.seek(target.stat().st_size // 2)
            byte = handle.read(1)[0]
            handle.seek(-1, os.SEEK_CUR)
            handle.write(bytes([byte ^ 0x10]))
    else:
        (checkpoint / "meta.json").unlink()


def wait_state(client: Control, state: str, timeout: float = 30) -> dict[str, Any]:
    row: dict[str, Any] = {}

    def check() -> bool:
        row.update(client.job("j"))
        return bool(row["state"] == state)

    if not wait_until(check, timeout, 0.05):
        raise RuntimeError(f"job not {state} within {timeout}s: {row}")
    return row


def damaged_cycle(area: Area, client: Control, kind: str) -> tuple[bool, int, str]:
    """Run, stop, damage the newest checkpoint, start; (survived, lost, note)."""
    if client.job("j")["state"] != "RUNNING":
        client.result("start", {"job": "j"})
    first = wait_state(client, "RUNNING")
    wait_until(lambda: int(client.job("j")["step"]) >= int(first["step"]) + 12, 30, 0.05)
    client.result("stop", {"job": "j"})
    wait_state(client, "STOPPED")
    paths = list_checkpoints(area.checkpoints("j"))
    newest, previous = paths[-1], paths[-2]
    damage(newest, kind)
    client.result("start", {"job": "j"})
    pid = int(wait_state(client, "RUNNING")["pid"])
    hello = next((r for r in json_lines(area.root / "daemon.log")
                  if r.get("event") == "worker_hello" and r.get("pid") == pid), {})
    resumed = int(hello.get("start_step", -1))
    spawn = next((e for e in area.history("j") if e.get("event") == "spawn" and e.get("pid") == pid), {})
    expected = int(previous.name.removeprefix("ckpt-"))
    stderr = (area.state_dir / "logs" / "jobs" / "j" / "stderr.log").read_text(errors="replace")
    logged = f"checkpoint_damaged path={newest}" in stderr
    note = (f"{kind} {newest.name}: resumed at {resumed} (previous {expected}), damage logged by worker: {logged}, "
            f"spawn.from_checkpoint {spawn.get('from_checkpoint')}")
    return resumed == expected and logged, int(0 <= resumed < expected), note


def damaged(ws: Workspace, rounds: int) -> FaultResult:
    """Each damage kind ``rounds`` times under one service-mode daemon."""
    result = FaultResult("damaged newest checkpoint")
    area = ws.area("damaged")
    config = area.config({"j": {"autostart": False, "checkpoint_every": 5, "keep_checkpoints": 4, "budget": "2GiB",
                                "train": {**SMALL, "steps": 1_000_000}}})
    daemon = start_daemon(area, config, ws.mark)
    try:
        client = Control.ipc(area.run_dir)
        try:
            for kind in ["truncated", "bit-flipped", "meta.json missing"] * rounds:
                ok, lost, note = damaged_cycle(area, client, kind)
                result.count += 1
                result.survived += ok
                result.checkpoints_lost += lost
                if not ok or result.count <= 3:
                    result.note(note)
            client.result("shutdown")
        finally:
            client.close()
        daemon.wait(60)
    except RuntimeError as exc:
        result.note(f"aborted: {exc}")
    finally:
        daemon.kill()
        result.orphans = sweep_orphans(ws.mark, 5)
    return result

