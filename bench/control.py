"""Control plane and daemon footprint: idle CPU and RSS, control-request latency, telemetry ingest rate.

- daemon idle: ``python -m supervisor.cli.mlxsupd -c CONFIG`` (service mode, foreground) with two jobs that do not
  autostart; after a settling second, CPU time (user + system, psutil) over ``idle_seconds`` ÷ wall, and
  RSS at the end. Then SIGTERM: it should exit 0 within a few seconds.
- control latency: when ``supervisor.control.client.ControlClient`` exists (feature-detected: the control
  plane is being built alongside), ``status`` requests round-tripped over the daemon's ipc control socket
  while it idles, p50/p99 in ms; null with a note otherwise.
- telemetry ingest: a synthetic worker (``bench.flood``, spawned by ``mlxsupd run`` with its token) floods
  Step frames; the rate is the count of step records the daemon wrote to telemetry.jsonl over their time
  span (each one decoded, validated, fed to the estimator and the policy, and recorded).
"""

from __future__ import annotations

import importlib
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil

from bench.common import (
    PYTHON,
    SMALL,
    BenchError,
    Child,
    percentile,
    read_json,
    rounded,
    run_supervised,
    short_run_dir,
)
from supervisor.config import write_config

NOT_BUILT = "control plane not built yet"


def control_client_class() -> Any | None:
    """``ControlClient`` when the control plane is importable and has the request API we use, else None."""
    try:
        module = importlib.import_module("supervisor.control.client")
    except ImportError:
        return None
    client = getattr(module, "ControlClient", None)
    return client if client is not None and callable(getattr(client, "call", None)) else None


def status_latency(client: Any, requests: int) -> dict[str, Any]:
    """p50/p99 in ms of ``requests`` sequential ``status`` round trips over a connected ControlClient."""
    times = []
    for _ in range(requests):
        started = time.perf_counter()
        client.call("status")
        times.append((time.perf_counter() - started) * 1000)
    return {"control_p99_ms": rounded(percentile(times, 0.99), 3), "control_p50_ms": rounded(percentile(times, 0.5), 3),
            "control_requests": requests}


def _latency(client_class: Any, endpoint: str, requests: int) -> dict[str, Any]:
    client = client_class(endpoint, timeout=5.0)
    try:
        client.call("status")  # connect and warm up
        result = status_latency(client, requests)
    finally:
        client.close()
    return {**result, "control_note": f"'status' over ipc, {requests} sequential requests"}


def _latency_under_load(client_class: Any, endpoint: str, requests: int) -> dict[str, Any]:
    """Round trips while both configured jobs run and stream telemetry (the figure the issue asks for)."""
    client = client_class(endpoint, timeout=5.0)
    try:
        for job in ("a", "b"):
            client.call("start", {"job": job})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            jobs = client.call("status")["jobs"]
            if all(j["state"] == "RUNNING" and j["step"] > 20 for j in jobs):
                break
            time.sleep(0.2)
        else:
            raise BenchError("jobs did not start streaming telemetry within 60 s")
    finally:
        client.close()
    result = _latency(client_class, endpoint, requests)
    result["control_note"] = f"'status' over ipc while 2 jobs stream telemetry, {requests} sequential requests"
    return result


def _idle_usage(proc: psutil.Process, seconds: float) -> tuple[float, int]:
    before, started = proc.cpu_times(), time.monotonic()
    time.sleep(seconds)
    after, wall = proc.cpu_times(), time.monotonic() - started
    cpu = (after.user - before.user) + (after.system - before.system)
    return cpu / wall, int(proc.memory_info().rss)


def daemon_idle(work: Path, idle_seconds: float, requests: int) -> dict[str, Any]:
    """Idle CPU fraction and RSS of the service-mode daemon, then control latency and a SIGTERM stop."""
    job = {"autostart": False, "budget": "1GiB", "checkpoint_every": 0, "train": {**SMALL, "steps": 10**7}}
    result: dict[str, Any] = {"control_p99_ms": None, "control_note": NOT_BUILT}
    with short_run_dir() as run_dir:
        config = write_config(work / "mlxsupd.toml", {"run_dir": str(run_dir), "state_dir": str(work / "state")},
                              {"a": job, "b": job})
        argv = [PYTHON, "-m", "supervisor.cli.mlxsupd", "-c", str(config), "--log-format", "json"]
        with open(work / "daemon.log", "ab") as log, Child(argv, stdout=log, stderr=subprocess.STDOUT) as child:
            control_up = child.wait_for_path(run_dir / "control.sock", 5.0)
            if not child.wait_for_path(run_dir / "workers.sock", 5.0):
                raise BenchError(f"daemon did not start; see {work / 'daemon.log'}")
            time.sleep(1.0)  # let start-up work settle
            cpu, rss = _idle_usage(psutil.Process(child.pid), idle_seconds)
            result.update(daemon_idle_cpu_fraction=round(cpu, 5), daemon_rss_bytes=rss, idle_seconds=idle_seconds)
            client = control_client_class()
            if client is not None and control_up:
                try:
                    endpoint = f"ipc://{run_dir / 'control.sock'}"
                    idle = _latency(client, endpoint, requests)
                    result.update({f"idle_{k}": v for k, v in idle.items() if k.startswith("control_p")})
                    result.update(_latency_under_load(client, endpoint, requests))
                except Exception as exc:
                    result["control_note"] = f"control client present but failed: {type(exc).__name__}: {exc}"
            elif client is not None:
                result["control_note"] = "control client present but the daemon opened no control.sock"
            result.update(_stop(child))
    return result


def _stop(child: Child) -> dict[str, Any]:
    started = time.monotonic()
    code = child.stop(10)
    if code is None:
        return {"sigterm_exit_code": None, "sigterm_exit_seconds": None}
    return {"sigterm_exit_code": code, "sigterm_exit_seconds": round(time.monotonic() - started, 3)}


def telemetry_ingest(work: Path, messages: int, linger: float, timeout: float) -> dict[str, Any]:
    """Step frames per second the daemon decodes, evaluates and records, from a flooding synthetic worker."""
    stats = work / "flood.json"
    job = {"budget": "4GiB", "hang_timeout": 60,
           "command": [PYTHON, "-m", "bench.flood", "--messages", str(messages), "--stats", str(stats),
                       "--linger", str(linger)]}
    run = run_supervised(work, job, timeout)
    times = sorted(r["t"] for r in run.telemetry if r.get("k") == "step")
    if len(times) < 2 or times[-1] <= times[0]:
        outcome = run.summary.get("outcome")
        return {"telemetry_msgs_per_s": None, "telemetry_note": f"no step records (outcome {outcome})"}
    rate = (len(times) - 1) / (times[-1] - times[0])
    sent = read_json(stats).get("per_second") if stats.exists() else None
    if sent is None:
        note = "the flood wrote no send rate"
    elif rate >= 0.9 * float(sent):
        note = "sender-bound: the daemon kept up with the flood, so this is a lower bound"
    else:
        note = f"daemon-bound: the flood sent {float(sent):,.0f}/s, frames queued for the daemon"
    return {"telemetry_msgs_per_s": round(rate, 1), "telemetry_recorded": len(times), "telemetry_sent": messages,
            "flood_send_per_s": rounded(sent, 1), "telemetry_note": note}
