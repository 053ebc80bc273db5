"""The Prometheus text exposition format (0.0.4) of a daemon's status: ``/metrics`` of ``mlxsupctl dashboard``
and ``mlxsupctl metrics --textfile`` (node_exporter's textfile collector) write the same text.

Pure: a status reply and the last step telemetry per (job, rank) in, text out. The "Prometheus metrics"
section of docs/running.md lists every family below; a test checks the two agree.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STATES = ("STOPPED", "STARTING", "RUNNING", "CHECKPOINTING", "STOPPING", "BACKOFF", "WAITING_FOR_MEMORY",
          "FINISHED", "FATAL")

# name -> (type, help). The order is the order of the text.
FAMILIES: dict[str, tuple[str, str]] = {
    "mlxsup_up": ("gauge", "1 when the daemon answered the last status request, else 0"),
    "mlxsup_daemon_info": ("gauge", "the daemon's version, as a label (always 1)"),
    "mlxsup_daemon_cpu_seconds_total": ("counter", "CPU time (user + system) the daemon process has used"),
    "mlxsup_daemon_resident_memory_bytes": ("gauge", "resident set size of the daemon process"),
    "mlxsup_system_available_bytes": ("gauge", "memory available to new allocations on the daemon's host"),
    "mlxsup_system_total_bytes": ("gauge", "total physical memory of the daemon's host"),
    "mlxsup_system_floor_bytes": ("gauge", "the system floor: under it, jobs checkpoint and wait (0: off)"),
    "mlxsup_system_pressure_level": ("gauge", "macOS memory pressure level (1 normal, 2 warn, 4 critical)"),
    "mlxsup_job_state": ("gauge", "1 for the job's current state, 0 for the others"),
    "mlxsup_job_footprint_bytes": ("gauge", "sampled footprint of the worker's process group (what the policy "
                                            "acts on), per rank"),
    "mlxsup_job_budget_bytes": ("gauge", "the job's memory budget (per rank for a gang)"),
    "mlxsup_job_warn_bytes": ("gauge", "the warn line: above it the worker is asked to clear its cache"),
    "mlxsup_job_kill_bytes": ("gauge", "the kill ceiling: above it the worker's group is killed"),
    "mlxsup_job_mlx_active_bytes": ("gauge", "MLX active memory reported by the worker at its last step"),
    "mlxsup_job_mlx_cache_bytes": ("gauge", "MLX cache memory reported by the worker at its last step"),
    "mlxsup_job_steps_total": ("counter", "optimizer steps the job has completed"),
    "mlxsup_job_target_steps": ("gauge", "the step the job runs to (0: unknown)"),
    "mlxsup_job_steps_per_second": ("gauge", "recent training speed"),
    "mlxsup_job_restarts_total": ("counter", "worker restarts, by reason"),
    "mlxsup_job_samples_over_budget_total": ("counter", "footprint samples at or over the budget"),
    "mlxsup_job_leak_bytes_per_step": ("gauge", "estimated footprint growth per step in the current life"),
}

Sample = tuple[str, dict[str, str], float]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(int(value)) if float(value).is_integer() and abs(value) < 2**53 else repr(float(value))


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def render(status: dict[str, Any] | None, mlx: dict[tuple[str, int], dict[str, Any]] | None = None) -> str:
    """The exposition text; ``status`` None (the daemon did not answer) gives ``mlxsup_up 0`` only."""
    samples = list(_samples(status, mlx or {}))
    lines: list[str] = []
    for name, (kind, text) in FAMILIES.items():
        rows = [s for s in samples if s[0] == name]
        if not rows:
            continue
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
        for _, labels, value in rows:
            label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            lines.append(f"{name}{{{label_text}}} {_number(value)}" if labels else f"{name} {_number(value)}")
    return "\n".join(lines) + "\n"


def _samples(status: dict[str, Any] | None, mlx: dict[tuple[str, int], dict[str, Any]]) -> Iterable[Sample]:
    yield "mlxsup_up", {}, 0.0 if status is None else 1.0
    if status is None:
        return
    daemon = status.get("daemon") or {}
    if "version" in daemon:
        yield "mlxsup_daemon_info", {"version": str(daemon["version"])}, 1.0
    for name, key in (("mlxsup_daemon_cpu_seconds_total", "cpu_seconds"),
                      ("mlxsup_daemon_resident_memory_bytes", "rss_bytes")):
        if (value := _num(daemon.get(key))) is not None:
            yield name, {}, value
    system = status.get("system") or {}
    for name, key in (("mlxsup_system_available_bytes", "available_bytes"),
                      ("mlxsup_system_total_bytes", "total_bytes"), ("mlxsup_system_floor_bytes", "floor_bytes"),
                      ("mlxsup_system_pressure_level", "pressure")):
        if (value := _num(system.get(key))) is not None:
            yield name, {}, value
    for row in status.get("jobs", []):
        yield from _job_samples(row, mlx)


def _job_samples(row: dict[str, Any], mlx: dict[tuple[str, int], dict[str, Any]]) -> Iterable[Sample]:
    job = str(row.get("name", ""))
    state = str(row.get("state", ""))
    for name in (*STATES, *([state] if state not in STATES else [])):
        yield "mlxsup_job_state", {"job": job, "state": name}, 1.0 if name == state else 0.0
    ranks = row.get("ranks") or [{"rank": 0, "sampled_bytes": row.get("sampled_bytes")}]
    for rank in ranks:
        labels = {"job": job, "rank": str(rank.get("rank", 0))}
        if rank.get("host"):
            labels["host"] = str(rank["host"])
        if (value := _num(rank.get("sampled_bytes"))) is not None:
            yield "mlxsup_job_footprint_bytes", labels, value
        telemetry = mlx.get((job, int(rank.get("rank", 0)))) if not rank.get("host") else None
        for name, key in (("mlxsup_job_mlx_active_bytes", "mlx_active"), ("mlxsup_job_mlx_cache_bytes", "mlx_cache")):
            if telemetry is not None and (value := _num(telemetry.get(key))) is not None:
                yield name, labels, value
    for name, key in (("mlxsup_job_budget_bytes", "budget_bytes"), ("mlxsup_job_warn_bytes", "warn_bytes"),
                      ("mlxsup_job_kill_bytes", "kill_bytes"), ("mlxsup_job_steps_total", "step"),
                      ("mlxsup_job_target_steps", "target_steps"),
                      ("mlxsup_job_steps_per_second", "steps_per_second"),
                      ("mlxsup_job_samples_over_budget_total", "samples_over_budget"),
                      ("mlxsup_job_leak_bytes_per_step", "leak_bytes_per_step")):
        value = _num(row.get(key))
        if value is not None or key == "target_steps":
            yield name, {"job": job}, value or 0.0
    reasons = row.get("restart_reasons") or {}
    if not reasons and row.get("restarts"):
        reasons = {"unknown": row["restarts"]}  # a daemon older than restart_reasons in status
    for reason, count in sorted(reasons.items()):
        if (value := _num(count)) is not None:
            yield "mlxsup_job_restarts_total", {"job": job, "reason": str(reason)}, value


def write_textfile(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a temporary file in the same directory, then a rename), so the
    textfile collector never reads half a file."""
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
