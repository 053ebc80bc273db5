"""The checks of the Mac acceptance kit (``supervisor.tools.acceptance``), each a function returning one ``Row``.

Every check runs real parts: a real MLX allocation in a child, ``mlxsupd run`` on real leaking workers, a real
SIGKILL of a worker while its ``.tmp-ckpt-*`` directory shows a save in flight, the real fsync calls, a real
LaunchAgent. Everything a check starts runs in its own process group and is killed as a group on the way out; every
wait is bounded.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocol.checkpoints import CheckpointDamaged, latest_step, list_checkpoints, verify
from protocol.darwin import is_macos
from protocol.durable import full_fsync, write_durably
from supervisor import paths
from supervisor.config import DaemonConfig, write_config
from supervisor.core.sizes import format_bytes, parse_bytes
from supervisor.daemon.footprint import pressure_level, process_footprint

PASS, FAIL, WARN, ELSEWHERE = "PASS", "FAIL", "WARN", "not on this platform"
MiB = 2**20
TINY = {"dim": 32, "layers": 1, "heads": 2, "context": 32}  # fast on 2 cores
MODEL = {"dim": 128, "layers": 2, "heads": 4, "context": 32}  # a checkpoint that takes long enough to hit
RUN_TIMEOUT = 240.0  # s for one `mlxsupd run`

# Allocates argv[1] bytes of MLX memory on device argv[2] when told ("go" on stdin), then idles until killed.
_ALLOCATE = """
import sys, time
import mlx.core as mx
metal = sys.argv[2] == "gpu" and mx.metal.is_available()
mx.set_default_device(mx.gpu if metal else mx.cpu)
mx.eval(mx.ones((1024,)))  # the device is up before the baseline is read
print("base", "gpu" if metal else "cpu", flush=True)
sys.stdin.readline()
held = mx.ones((int(sys.argv[1]) // 4,), dtype=mx.float32)  # written, so resident, not lazily zero
mx.eval(held)
print("ready", mx.get_active_memory(), flush=True)
time.sleep(600)
"""


@dataclass
class Row:
    """One line of the kit's table (and one object of its JSON)."""

    check: str
    status: str
    measured: str
    detail: str
    data: dict[str, Any] = field(default_factory=dict)


def elsewhere(check: str, what: str) -> Row:
    return Row(check, ELSEWHERE, "-", f"{what}: macOS only; this is {sys.platform}")


@contextlib.contextmanager
def _group(argv: list[str], **kw: Any) -> Iterator[subprocess.Popen[bytes]]:
    """A child in its own process group, killed (group-wide) and reaped on the way out."""
    proc = subprocess.Popen(argv, start_new_session=True, **kw)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def _line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline().decode().strip() if ready else ""


# --- footprint ---------------------------------------------------------------------------------------------


def check_allocation(mib: int) -> Row:
    """A real MLX allocation of ``mib`` MiB (Metal on macOS, CPU elsewhere) shows in the footprint within 10%."""
    device = "gpu" if is_macos() else "cpu"
    name = f"{'Metal' if device == 'gpu' else 'CPU'} allocation in {'phys_footprint' if is_macos() else 'RSS'}"
    with _group([sys.executable, "-c", _ALLOCATE, str(mib * MiB), device], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE) as child:
        base = _line(child, 120).split()
        if not base or base[0] != "base":
            exited = child.poll() is not None and child.stderr is not None
            error = child.stderr.read(2000).decode(errors="replace") if exited and child.stderr else ""
            return Row(name, FAIL, "-", f"the MLX child did not start on {device}: {error.strip()[-300:]}")
        before = process_footprint(child.pid) or 0
        assert child.stdin is not None
        child.stdin.write(b"go\n")
        child.stdin.flush()
        ready = _line(child, 120).split()
        after = process_footprint(child.pid) or 0
    if not ready or ready[0] != "ready":
        return Row(name, FAIL, "-", f"the MLX child did not allocate {mib} MiB on {device}")
    grown, wanted, used = after - before, mib * MiB, base[1]
    off = abs(grown - wanted) / wanted
    status = FAIL if off > 0.10 else PASS if used == device else WARN
    missing = "" if used == device else "; no Metal device here (a VM?), so this was a CPU allocation"
    return Row(name, status, f"{grown / MiB:.0f} of {mib} MiB ({off:.1%} off)",
               f"footprint {format_bytes(before)} -> {format_bytes(after)} from outside; MLX active "
               f"{int(ready[1]) / MiB:.0f} MiB on {used}; within 10% passes{missing}",
               {"device": used, "mib": mib, "before": before, "after": after, "off": round(off, 4)})


# --- mlxsupd runs ------------------------------------------------------------------------------------------


def _config(workdir: Path, run_dir: Path, name: str, job: dict[str, Any]) -> Path:
    return write_config(workdir / f"{name}.toml", {"run_dir": str(run_dir), "state_dir": str(workdir / "state"),
                                                   "system_floor": "0"}, {name: job})


def _mlxsupd_run(config: Path, name: str, summary: Path) -> list[str]:
    return [sys.executable, "-m", "supervisor.cli.mlxsupd", "run", "-c", str(config), name, "--summary",
            str(summary), "--log-format", "json"]


def _finish(proc: subprocess.Popen[bytes], summary: Path, timeout: float) -> dict[str, Any] | None:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    loaded: dict[str, Any] = json.loads(summary.read_text()) if summary.exists() else {}
    return loaded or None


def check_leaking_job(workdir: Path, run_dir: Path) -> tuple[Row, Path | None]:
    """A job leaking 50 MiB per step, supervised by mlxsupd to its target with no sample over the kill ceiling."""
    name = "leak"
    job = {"budget": "900MiB", "checkpoint_every": 5, "backoff_initial": 0.2,
           "train": {**TINY, "steps": 60, "leak_mb_per_step": 50}}
    summary = workdir / f"{name}.summary.json"
    where = "on MLX's default device (the GPU where Metal is)" if is_macos() else "on the CPU"
    with _group(_mlxsupd_run(_config(workdir, run_dir, name, job), name, summary), stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL) as proc:
        result = _finish(proc, summary, RUN_TIMEOUT)
    if result is None:
        return Row("leaking job supervised", FAIL, "-", f"no summary within {RUN_TIMEOUT:.0f} s"), None
    ok = (result["outcome"] == "finished" and result["steps_completed"] == result["target_steps"]
          and result["samples_over_kill"] == 0 and result["restarts"] >= 1)
    measured = (f"{result['steps_completed']}/{result['target_steps']} steps, {result['restarts']} recycles, "
                f"{result['samples_over_kill']} of {result['samples']} samples over kill")
    detail = (f"50 MiB/step leak {where}; max {format_bytes(result['max_sampled_bytes'])} against budget "
              f"{format_bytes(result['budget_bytes'])}, kill {format_bytes(result['kill_bytes'])}")
    return Row("leaking job supervised", PASS if ok else FAIL, measured, detail, result), Path(
        result["history_path"]).parent


def _scratch_writers(directory: Path) -> list[int]:
    """Pids of the writers of the ``.tmp-ckpt-STEP-PID-*`` directories in ``directory`` (saves in flight)."""
    try:
        names = [e.name for e in os.scandir(directory) if e.name.startswith(".tmp-ckpt-")]
    except FileNotFoundError:
        return []
    return [int(parts[3]) for parts in (n.split("-") for n in names) if len(parts) > 4 and parts[3].isdigit()]


def _kill_during_a_save(directory: Path, proc: subprocess.Popen[bytes], timeout: float) -> dict[str, Any] | None:
    """Poll (1 ms) for a save in flight once a complete checkpoint exists (so there is something to lose); SIGKILL
    its writer. What was on disk before and after, or None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        before = latest_step(directory) or 0
        writers = _scratch_writers(directory) if before else []
        if writers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(writers[0], signal.SIGKILL)
                time.sleep(0.05)
                during = writers[0] in _scratch_writers(directory)  # its half-written save is still there
                newest = list_checkpoints(directory)
                return {"pid": writers[0], "during_write": during, "newest_before": before,
                        "newest_after": latest_step(directory) or 0,
                        "newest_verifies": _verifies(newest[-1]) if newest else False}
        time.sleep(0.001)
    return None


def _verifies(path: Path) -> bool:
    try:
        verify(path)
    except CheckpointDamaged:
        return False
    return True


def check_sigkill_mid_checkpoint(workdir: Path, run_dir: Path) -> Row:
    """SIGKILL the worker while a checkpoint is being written: the newest complete checkpoint still verifies, the
    job resumes and finishes, and every checkpoint left on disk verifies."""
    name = "ckpt"
    job = {"budget": "4GiB", "checkpoint_every": 1, "keep_checkpoints": 3, "backoff_initial": 0.2,
           "train": {**MODEL, "steps": 40}}
    summary, check = workdir / f"{name}.summary.json", "SIGKILL mid-checkpoint"
    directory = workdir / "state" / "jobs" / name / "checkpoints"
    with _group(_mlxsupd_run(_config(workdir, run_dir, name, job), name, summary), stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL) as proc:
        kill = _kill_during_a_save(directory, proc, 120)
        result = _finish(proc, summary, RUN_TIMEOUT)
    if kill is None or result is None:
        return Row(check, FAIL, "-", "no save in flight was seen to kill" if kill is None else "no summary")
    directory = Path(result["checkpoint_dir"])
    left = list_checkpoints(directory)
    ok = (kill["during_write"] and kill["newest_verifies"] and kill["newest_after"] >= kill["newest_before"]
          and result["outcome"] == "finished"
          and result["steps_completed"] == result["target_steps"] and all(_verifies(p) for p in left))
    return Row(check, PASS if ok else FAIL,
               f"killed pid {kill['pid']} mid-save; newest {kill['newest_before']} -> {kill['newest_after']}",
               f"its .tmp-ckpt-* left half-written: {kill['during_write']}; newest complete checkpoint verified "
               f"after the kill: {kill['newest_verifies']}; run "
               f"{result['outcome']} at {result['steps_completed']}/{result['target_steps']} steps, "
               f"{len(left)} checkpoints left, all verify", {**kill, "outcome": result["outcome"]})


def check_growth(job_dir: Path | None) -> Row:
    """The default growth_rate the sampling cadence assumes, against the fastest growth sampled in the leak run."""
    from supervisor.tools.plot import NoTelemetry, load_series

    assumed = parse_bytes(DaemonConfig().growth_rate)
    check = "growth_rate vs fastest growth seen"
    try:
        samples = load_series(job_dir).samples if job_dir is not None else []
    except NoTelemetry:
        samples = []
    rates = [(b2 - b1) / (t2 - t1) for (t1, b1), (t2, b2) in itertools.pairwise(samples) if t2 > t1]
    if not rates:
        return Row(check, FAIL, "-", "no samples of the leaking job to measure")
    fastest = max(rates)
    where = "GPU" if is_macos() else "CPU"
    return Row(check, PASS if fastest < assumed else WARN,
               f"{format_bytes(int(max(fastest, 0)))}/s vs {DaemonConfig().growth_rate}/s",
               f"fastest rise between two samples of the leaking job on the {where} ({len(samples)} samples), against "
               "daemon.growth_rate; WARN: the sampling cadence assumes less than was seen",
               {"fastest_bytes_per_second": int(fastest), "growth_rate_bytes_per_second": assumed})


# --- the file system, and macOS itself ---------------------------------------------------------------------


def check_durable_write(directory: Path) -> Row:
    """F_FULLFSYNC (macOS) or fsync works on the checkpoint volume, for a file and its directory."""
    directory.mkdir(parents=True, exist_ok=True)
    command = getattr(fcntl, "F_FULLFSYNC", None)
    probe = directory / "durable-probe"
    write_durably(probe, b"x" * 4096)
    if command is None:
        with open(probe, "rb") as fh:
            full_fsync(fh.fileno())  # fsync: this platform has no F_FULLFSYNC
        return Row("fsync on the checkpoint volume", PASS, "fsync ok", f"{directory}: {sys.platform} has no "
                   "F_FULLFSYNC; the durable write is fsync of the file and its directory")
    results = []
    for path, flags in ((probe, os.O_RDONLY), (directory, os.O_RDONLY | os.O_DIRECTORY)):
        fd = os.open(path, flags)
        try:
            fcntl.fcntl(fd, command)
            results.append("ok")
        except OSError as exc:
            results.append(exc.strerror or str(exc))
        finally:
            os.close(fd)
    ok = results == ["ok", "ok"]
    return Row("F_FULLFSYNC on the checkpoint volume", PASS if ok else FAIL, f"file {results[0]}, dir {results[1]}",
               f"{directory} on {_file_system(directory)}" + ("" if ok else ": durable writes fall back to fsync"))


def _file_system(path: Path) -> str:
    done = subprocess.run(["stat", "-f", "%T", str(path)], capture_output=True, text=True, timeout=10, check=False)
    return done.stdout.strip() or "an unknown file system"


def check_pressure() -> Row:
    if not is_macos():
        return elsewhere("memory pressure level", "kern.memorystatus_vm_pressure_level")
    level = pressure_level()
    return Row("memory pressure level", PASS if level in (1, 2, 4) else FAIL, str(level),
               "kern.memorystatus_vm_pressure_level: 1 normal, 2 warn, 4 critical")


def check_run_dir() -> Row:
    if not is_macos():
        return elsewhere("run dir under $TMPDIR", "the per-user $TMPDIR (confstr 65537)")
    temp, run_dir = paths.darwin_user_temp_dir(), paths.default_run_dir()
    ok = temp is not None and run_dir.parent == temp and os.environ.get("TMPDIR", str(temp)).rstrip("/") == str(
        temp).rstrip("/")
    too_long = [name for name in paths.IPC_SOCKETS if paths.socket_path_problem(run_dir / name)]
    return Row("run dir under $TMPDIR", PASS if ok and not too_long else FAIL, str(run_dir),
               f"$TMPDIR {os.environ.get('TMPDIR')!r}, confstr(65537) {temp}; sockets too long: {too_long or 'none'}")


def check_launch_agent(workdir: Path, run_dir: Path) -> Row:
    """A throwaway LaunchAgent (our own plist renderer, ProcessType as mlxsupctl service sets it) runs a short job
    under mlxsupd to its end, then is booted out and gone."""
    check = "LaunchAgent runs a job"
    if not is_macos():
        return elsewhere(check, "launchctl bootstrap/print/bootout under gui/$UID")
    from supervisor.install.units import PROCESS_TYPE, daemon_program, render_plist
    from supervisor.tools.launch_agent import LABEL_PREFIX, AgentUnavailable, throwaway_agent

    name, label = "agent", f"{LABEL_PREFIX}.kit.{os.getpid()}"
    config = _config(workdir, run_dir, name, {"budget": "2GiB", "train": {**TINY, "steps": 20}})
    summary = workdir / f"{name}.summary.json"
    plist = render_plist([*daemon_program(), "run", name, "--summary", str(summary)], config, workdir, workdir,
                         label=label, exit_timeout=10)
    seen: dict[str, Any] = {}
    try:
        with throwaway_agent([], workdir, plist=plist, label=label) as agent:
            seen["process_type"] = agent.process_type()
            deadline = time.monotonic() + RUN_TIMEOUT
            while not summary.exists() and time.monotonic() < deadline:
                seen["process_type"] = seen["process_type"] or agent.process_type()
                time.sleep(0.5)
        seen["left"] = not agent.loaded()
    except AgentUnavailable as exc:
        return Row(check, WARN, "-", f"{exc}: log in at the GUI and run the kit again for this row")
    result = json.loads(summary.read_text()) if summary.exists() else {}
    shown = seen.get("process_type")
    ok = result.get("outcome") == "finished" and seen.get("left") is True and shown in (PROCESS_TYPE, None)
    return Row(check, PASS if ok else FAIL, f"job {result.get('outcome', 'did not finish')}, ProcessType "
               f"{shown or 'not printed'}", f"label {label}; plist ProcessType {PROCESS_TYPE}, launchctl print spawn "
               f"type {shown or '(none printed)'}; booted out and gone: {seen.get('left')}", {**seen, **result})
