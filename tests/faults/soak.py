"""Soak: a daemon recycles fast-leaking jobs thousands of times, and nothing it keeps grows.

Four jobs (two SDK workers leaking 8 MiB per 10 ms step, recycled by ``leak_predicted``; two guard-only commands
leaking 16 MiB per 5 ms, SIGTERMed or SIGKILLed at their budget and started over) under one service daemon with
small rotation settings, beside a control client and an event subscriber that reconnect in a loop and a real
``mlxsupctl tail -f`` started over every few seconds. SIGHUP every ``hup_every`` seconds; one SIGKILL of the
daemon halfway, and a new daemon on the same state.

At each mark (1k and 10k restarts by default) and at the end: the daemon's RSS, fds, threads and CPU seconds per
restart since the previous figure, the disk used under the state dir, and the seconds a new daemon takes to
answer on a copy of that state. The checks: RSS at the end within 2 MiB of RSS 1k restarts into the same
daemon process (and of the first daemon's at 1k); fds and threads equal at every figure of a daemon process;
disk within the bound of the rotation settings; start time flat (the end's within 1.5 s of the first's:
Python's start and a loaded machine's noise, not the state, make it up).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from tests.faults.common import FaultResult, Group, Workspace, start_daemon, sweep_orphans
from tests.faults.soak_parts import (
    Probe,
    Shape,
    disk_bound,
    disk_used,
    restarts,
    start_seconds,
    tail_loop_argv,
    write_soak_config,
)
from tests.faults.wire import Control

RSS_SLACK = 2 * 2**20
START_SLACK = 1.5  # seconds


@dataclasses.dataclass(frozen=True)
class SoakPlan:
    """How long the soak runs: ``restarts`` in all (or ``budget_seconds``, whichever comes first)."""

    restarts: int = 20_000
    marks: tuple[int, ...] = (1_000, 10_000)
    hup_every: float = 60.0
    budget_seconds: float = 4 * 3600.0
    shape: Shape = dataclasses.field(default_factory=Shape)
    progress: Path | None = None  # where each figure's soak document is written as it is taken (a partial run's)


@dataclasses.dataclass
class Life:
    """One daemon process of the soak."""

    daemon: Group
    probe: Probe
    client: Control
    base: int  # restarts counted before this process
    figures: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def run(ws: Workspace, plan: SoakPlan) -> FaultResult:
    result = FaultResult("soak")
    if plan.restarts <= 0:
        result.note("skipped: no restarts asked for (the quick campaign; tests/test_soak.py is the short soak)")
        return result
    area = ws.area("soak")
    config = write_soak_config(area, plan.shape)
    started = time.monotonic()
    soak: dict[str, Any] = {"plan": {"restarts": plan.restarts, "marks": list(plan.marks), "hup_every": plan.hup_every,
                                     **dataclasses.asdict(plan.shape)}, "figures": [], "hups": 0,
                            "t0": started}
    clients = Group([sys.executable, "-m", "tests.faults.soak_parts", "clients", str(config),
                     str(area.root / "clients.json")], area.root / "clients.log", ws.mark)
    life = _start(area, config, ws.mark, 0)
    tails = 0
    tail: Group | None = None
    stop: list[int] = []  # SIGTERM or SIGINT: stop early, but take the end's figures and write them
    handlers = {signum: signal.signal(signum, lambda signum, frame: stop.append(signum))
                for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        total, next_hup, killed = 0, time.monotonic() + plan.hup_every, False
        marks = sorted(m for m in plan.marks if m < plan.restarts)
        while total < plan.restarts and time.monotonic() - started < plan.budget_seconds and not stop:
            time.sleep(1.0)
            if tail is None or not tail.alive():
                if tail is not None:
                    tail.kill()
                tail, tails = Group(tail_loop_argv(config, "sdk0"), None, ws.mark), tails + 1
            now_restarts = restarts(life.client)
            if now_restarts is None:
                continue
            total = life.base + now_restarts
            first_in_life = not life.figures and total - life.base >= min(1000, plan.restarts // 4)
            if (marks and total >= marks[0]) or first_in_life:
                tail.kill()  # figures without the subscriber's connection, whose fd comes and goes with it
                tail = None
            if marks and total >= marks[0]:
                _figure(area, plan, life, total, soak, ws.mark, f"{marks.pop(0)}")
            if first_in_life and not life.figures:
                _figure(area, plan, life, total, soak, ws.mark, "1k into this daemon")
            if time.monotonic() >= next_hup:
                os.kill(life.daemon.pid, signal.SIGHUP)
                soak["hups"] += 1
                next_hup = time.monotonic() + plan.hup_every
            if not killed and total >= plan.restarts // 2:
                killed = True
                life = _kill_and_restart(area, config, ws.mark, life, total, soak)
        if tail is not None:
            tail.kill()
            tail = None
        soak["restarts"] = total
        soak["stopped_by_signal"] = stop[0] if stop else None
        _figure(area, plan, life, total, soak, ws.mark, "end")
        soak["seconds"] = round(time.monotonic() - started, 1)
        soak["restarts_per_second"] = round(total / max(soak["seconds"], 1e-9), 2)
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        life.daemon.kill(signal.SIGTERM, timeout=60)
        life.daemon.kill()
        life.client.close()
        if tail is not None:
            tail.kill()
        clients.kill(signal.SIGTERM, timeout=10)
        clients.kill()
        result.orphans = sweep_orphans(ws.mark)
    del soak["t0"]
    soak["tail_processes"] = tails
    soak["clients"] = _read_json(area.root / "clients.json")
    checks = soak_checks(soak, plan)
    soak["checks"] = checks
    result.count = 1
    result.survived = int(all(checks.values()))
    result.note(f"{soak.get('restarts', 0)} restarts in {soak.get('seconds')}s "
                f"({soak.get('restarts_per_second')}/s); failed: {[k for k, v in checks.items() if not v]}")
    result.extra["soak"] = soak
    return result


def _start(area: Any, config: Path, mark: str, base: int) -> Life:
    daemon = start_daemon(area, config, mark, log_name=f"daemon-{base}.log")
    return Life(daemon, Probe(daemon.pid), Control.ipc(area.run_dir), base)


def _kill_and_restart(area: Any, config: Path, mark: str, life: Life, total: int, soak: dict[str, Any]) -> Life:
    """SIGKILL the daemon alone (its orphaned workers checkpoint and leave), then start a new one."""
    os.kill(life.daemon.pid, signal.SIGKILL)
    life.daemon.wait(30)
    life.daemon.kill()
    life.client.close()
    started = time.monotonic()
    new = _start(area, config, mark, total)
    soak["sigkill"] = {"at_restarts": total, "restart_seconds": round(time.monotonic() - started, 3)}
    return new


def _figure(area: Any, plan: SoakPlan, life: Life, total: int, soak: dict[str, Any], mark: str, label: str) -> None:
    """One row of figures: the daemon process, the disk, a start on a copy of the state."""
    row: dict[str, Any] = {"label": label, "restarts": total, "daemon_pid": life.daemon.pid,
                           "seconds": round(time.monotonic() - soak["t0"], 1),
                           **life.probe.sample()}
    previous = life.figures[-1] if life.figures else None
    if previous is not None:
        done = max(1, total - previous["restarts"])
        row["cpu_ms_per_restart"] = round(1000 * (row["cpu_seconds"] - previous["cpu_seconds"]) / done, 3)
    else:
        row["cpu_ms_per_restart"] = round(1000 * row["cpu_seconds"] / max(1, total - life.base), 3)
    row["disk_bytes"] = disk_used(area.state_dir)
    row["disk_bound_bytes"] = disk_bound(plan.shape)
    row["start_seconds"] = start_seconds(area, plan.shape, mark, "startcopy")
    life.figures.append(row)
    soak["figures"].append(row)
    print(f"[faults] soak {label}: {json.dumps(row)}", file=sys.stderr, flush=True)
    if plan.progress is not None:
        partial = {key: value for key, value in soak.items() if key != "t0"}
        partial["restarts"] = total
        partial["checks"] = soak_checks(partial, plan)
        _write_json(plan.progress, {"soak": partial, "partial": True})


def _write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(document, indent=2) + "\n")
    os.replace(tmp, path)


def soak_checks(soak: dict[str, Any], plan: SoakPlan) -> dict[str, bool]:
    """The soak's pass/fail lines (see the module docstring)."""
    figures: list[dict[str, Any]] = soak["figures"]
    by_pid: dict[int, list[dict[str, Any]]] = {}
    for row in figures:
        by_pid.setdefault(row["daemon_pid"], []).append(row)
    end = figures[-1] if figures else {}
    first_1k = next((r for r in figures if r["label"] in ("1000", "1k into this daemon")), None)
    same = by_pid.get(end.get("daemon_pid", -1), [])
    starts = [r["start_seconds"] for r in figures]
    jobs = plan.shape.sdk_jobs + plan.shape.guard_jobs
    return {
        "restarts_done": soak.get("restarts", 0) >= plan.restarts,
        "rss_flat_in_each_daemon": all(rows[-1]["rss_bytes"] - rows[0]["rss_bytes"] <= RSS_SLACK
                                       for rows in by_pid.values() if rows),
        "rss_end_within_2MiB_of_1k": bool(first_1k and same and end["rss_bytes"] - first_1k["rss_bytes"] <= RSS_SLACK),
        # One fd per live worker (its statm reader): how many are alive at a look depends on the moment.
        "fds_equal": all(max(r["fds"] for r in rows) - min(r["fds"] for r in rows) <= jobs for rows in by_pid.values()),
        "threads_equal": all(len({r["threads"] for r in rows}) == 1 for rows in by_pid.values()),
        "disk_bounded": all(r["disk_bytes"] <= r["disk_bound_bytes"] for r in figures),
        "start_time_flat": bool(starts) and None not in starts and starts[-1] <= starts[0] + START_SLACK,
        "daemon_restarted": "sigkill" in soak or soak.get("restarts", 0) < plan.restarts // 2,
    }


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
