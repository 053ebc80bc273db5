"""The dashboard's cost: how fast an event reaches the page, and what an attached dashboard costs the daemon.

    python -m bench.dashboard [--seconds 20] [--rounds 2] [-o bench/results/dashboard.json]

- latency: a real daemon runs a leaking job; ``mlxsupctl dashboard`` serves it, and a client reads the page's
  event stream (``/events``, what the page's EventSource reads). ``stop`` and ``start`` are sent over the
  control socket; the time from sending a command to the stream's state event it causes is the latency (it
  includes the control round trip, so it over-states the push). Target: under 0.5 s.
- CPU: the daemon's CPU time per 1000 telemetry messages (steps) while one ``mlxsupctl tail -f JOB telemetry``
  subscribes, and while a dashboard with one open event stream is attached instead; the arms alternate in
  one run on the same daemon. Target ratio dashboard / tail <= 1 (within noise).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil

from bench.common import SMALL
from supervisor.config import write_config
from supervisor.control.client import ControlClient

CTL = [sys.executable, "-m", "supervisor.cli.mlxsupctl"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stream(url: str, seen: list[tuple[float, dict[str, Any]]], stop: threading.Event) -> None:
    """Read an SSE stream, appending (arrival, data) for each ``event`` message, until ``stop``."""
    with urllib.request.urlopen(url, timeout=30) as response:
        name = ""
        while not stop.is_set():
            line = response.readline().decode()
            if not line:
                return
            if line.startswith("event: "):
                name = line[7:].strip()
            elif line.startswith("data: ") and name == "event":
                seen.append((time.monotonic(), json.loads(line[6:])))


def _wait_state(seen: list[tuple[float, dict[str, Any]]], start: int, states: set[str], timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for arrival, data in seen[start:]:
            if data.get("kind") == "state" and data.get("state") in states:
                return arrival
        time.sleep(0.002)
    raise RuntimeError(f"no {states} event within {timeout}s")


def _cpu_per_1000(daemon: psutil.Process, client: ControlClient, seconds: float) -> float:
    step0, cpu0 = int(client.call("status")["jobs"][0]["step"]), sum(daemon.cpu_times()[:2])
    time.sleep(seconds)
    step1, cpu1 = int(client.call("status")["jobs"][0]["step"]), sum(daemon.cpu_times()[:2])
    steps = step1 - step0
    if steps <= 0:  # a recycle resumed from an earlier checkpoint: count nothing rather than guess
        return float("nan")
    return float(cpu1 - cpu0) / steps * 1000


def run(seconds: float, rounds: int) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="mlxsup-bench-dash-"))
    run_dir = Path(tempfile.mkdtemp(prefix="mlxsup-bd-", dir="/tmp"))
    run_dir.chmod(0o700)
    config = write_config(tmp / "c.toml", {"run_dir": str(run_dir), "state_dir": str(tmp / "state")},
                          {"leaky": {"budget": "600MiB", "checkpoint_every": 200,
                                     "train": {**SMALL, "steps": 10_000_000, "leak_mb_per_step": 1}}})
    procs: list[subprocess.Popen[bytes]] = []
    stop = threading.Event()
    try:
        daemon = subprocess.Popen([sys.executable, "-m", "supervisor.cli.mlxsupd", "-c", str(config)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        procs.append(daemon)
        client = ControlClient(f"ipc://{run_dir / 'control.sock'}", timeout=5)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if client.call("status")["jobs"][0]["state"] == "RUNNING":
                    break
            except Exception:  # not up yet: ControlError, or a reply without the job
                pass
            time.sleep(0.3)
        proc = psutil.Process(daemon.pid)
        tail_cpu: list[float] = []
        dash_cpu: list[float] = []
        latencies: list[float] = []
        for _ in range(rounds):
            tail = subprocess.Popen([*CTL, "-c", str(config), "tail", "-f", "leaky", "telemetry"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            procs.append(tail)
            time.sleep(1)
            tail_cpu.append(_cpu_per_1000(proc, client, seconds))
            tail.kill()
            tail.wait()
            port = _free_port()
            dash = subprocess.Popen([*CTL, "-c", str(config), "dashboard", "--port", str(port)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            procs.append(dash)
            seen: list[tuple[float, dict[str, Any]]] = []
            for _ in range(100):
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/api/snapshot", timeout=2).read()
                    break
                except OSError:
                    time.sleep(0.1)
            reader = threading.Thread(target=_stream, args=(f"http://127.0.0.1:{port}/events", seen, stop),
                                      daemon=True)
            reader.start()
            time.sleep(1)
            dash_cpu.append(_cpu_per_1000(proc, client, seconds))
            for command, states in (("stop", {"STOPPING", "CHECKPOINTING"}), ("start", {"STARTING"})):
                mark = len(seen)
                sent = time.monotonic()
                client.call(command, {"job": "leaky"})
                latencies.append(_wait_state(seen, mark, states, 10) - sent)
                if command == "stop":
                    deadline = time.monotonic() + 30
                    while client.call("status")["jobs"][0]["state"] != "STOPPED" and time.monotonic() < deadline:
                        time.sleep(0.1)
            deadline = time.monotonic() + 30
            while client.call("status")["jobs"][0]["state"] != "RUNNING" and time.monotonic() < deadline:
                time.sleep(0.1)
            dash.kill()
            dash.wait()
        client.call("shutdown")
        daemon.wait(timeout=60)
        client.close()
    finally:
        stop.set()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    tail_median = statistics.median([c for c in tail_cpu if c == c])
    dash_median = statistics.median([c for c in dash_cpu if c == c])
    return {"latency_s": {"max": round(max(latencies), 4), "median": round(statistics.median(latencies), 4),
                          "n": len(latencies), "target": 0.5},
            "daemon_cpu_s_per_1000_telemetry": {"tail_f": [round(c, 4) for c in tail_cpu],
                                                "dashboard": [round(c, 4) for c in dash_cpu],
                                                "ratio_dashboard_to_tail": round(dash_median / tail_median, 3)}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="per arm and round (default 20)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("-o", "--output", type=Path, default=None)
    args = parser.parse_args()
    result = run(args.seconds, args.rounds)
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
