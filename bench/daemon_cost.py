"""The daemon's own CPU cost per telemetry message: a step-rate sweep and a 16-job daemon.

Both run the service-mode daemon (``mlxsupd -c CONFIG``: control socket, event socket, every job's lifecycle)
over synthetic workers (``bench.synthetic``: the real Session SDK paced at a chosen step rate, no MLX work),
and measure CPU time, not wall time, since the machine may be shared: the daemon's process CPU (its main thread
and libzmq's I/O threads, from /proc through psutil) over a window of steady streaming, divided by the steps
the daemon took in during that window (the jobs' step counters, read through ``status`` at both ends).

- sweep: one job at 10, 100 and 1000 steps/s. Per rate: daemon CPU per second, per 1000 messages, and the
  worker's CPU per step. A least-squares line through (rate, CPU/s) splits the cost into a fixed part
  (sampling, heartbeats, ticks: paid per second whatever the rate) and a marginal part per message.
- sixteen: 16 jobs configured, 4 running at 100 steps/s each: daemon CPU per second and per 1000 messages,
  then the round-trip latency of ``status`` requests while they run (p50/p99).
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

from bench.common import PYTHON, BenchError, Child, rounded, short_run_dir
from bench.control import status_latency
from supervisor.config import write_config

SWEEP_RATES = (10, 100, 1000)
WARMUP_STEPS = 20  # steps each job must have taken before a window opens


def synthetic_job(rate: float, seconds: float, autostart: bool = True) -> dict[str, Any]:
    """A job running ``bench.synthetic`` at ``rate`` steps/s for about ``seconds`` (it is stopped earlier)."""
    steps = max(100, int(rate * seconds))
    return {"autostart": autostart, "budget": "2GiB", "checkpoint_every": 0, "hang_timeout": 60,
            "startup_timeout": 120,
            "command": [PYTHON, "-m", "bench.synthetic", "--rate", str(rate), "--steps", str(steps)]}


class LiveDaemon:
    """A service-mode mlxsupd over ``jobs``, with a control client; stopped with SIGTERM, then group-killed."""

    def __init__(self, run_dir: Path, work: Path, jobs: dict[str, dict[str, Any]], timeout: float = 10.0) -> None:
        from supervisor.control.client import ControlClient

        work.mkdir(parents=True, exist_ok=True)
        self.work = work
        self.state_dir = work / "state"
        config = write_config(work / "mlxsupd.toml", {"run_dir": str(run_dir), "state_dir": str(self.state_dir)},
                              jobs)
        argv = [PYTHON, "-m", "supervisor.cli.mlxsupd", "-c", str(config), "--log-format", "json"]
        self._log = open(work / "daemon.log", "ab")  # noqa: SIM115 - closed in close()
        self.child = Child(argv, stdout=self._log, stderr=subprocess.STDOUT)
        self.pid = self.child.pid
        sock = run_dir / "control.sock"
        if not self.child.wait_for_path(sock, timeout):
            self.close()
            raise BenchError(f"daemon did not open its control socket; see {work / 'daemon.log'}")
        self.endpoint = f"ipc://{sock}"
        self.events_endpoint = f"ipc://{run_dir / 'events.sock'}"
        self.client = ControlClient(self.endpoint, timeout=5.0)

    def jobs(self) -> dict[str, dict[str, Any]]:
        return {row["name"]: row for row in self.client.call("status")["jobs"]}

    def wait_streaming(self, names: list[str], min_step: int, timeout: float) -> None:
        """Until every job in ``names`` is RUNNING past ``min_step``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = self.jobs()
            if all(rows[n]["state"] == "RUNNING" and rows[n]["step"] >= min_step for n in names):
                return
            time.sleep(0.2)
        raise BenchError(f"jobs {names} did not stream telemetry within {timeout:.0f}s; see {self.work}")

    def close(self) -> None:
        """SIGTERM (every worker checkpoints and exits), then make sure the group is gone."""
        with contextlib.suppress(Exception):
            self.client.close()
        self.child.stop(20)
        self.child.kill()  # stragglers of the group, even after the daemon exited
        self._log.close()


@contextlib.contextmanager
def live_daemon(work: Path, jobs: dict[str, dict[str, Any]]) -> Iterator[LiveDaemon]:
    with short_run_dir() as run_dir:
        daemon = LiveDaemon(run_dir, work, jobs)
        try:
            yield daemon
        finally:
            daemon.close()


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of a process: its main thread, its other threads (libzmq's I/O and reaper), and the total."""
    proc = psutil.Process(pid)
    threads = proc.threads()
    main = sum(t.user_time + t.system_time for t in threads if t.id == pid)
    total = sum(t.user_time + t.system_time for t in threads)
    if not any(t.id == pid for t in threads):  # thread ids are not pids on this platform
        times = proc.cpu_times()
        main = total = times.user + times.system
    return {"main": main, "other_threads": total - main, "total": total}


def process_cpu(pid: int | None) -> float:
    if pid is None:
        return 0.0
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.NoSuchProcess:
        return 0.0
    return float(times.user + times.system)


def cpu_window(daemon: LiveDaemon, names: list[str], seconds: float) -> dict[str, Any]:
    """Daemon CPU (per thread kind), steps taken and worker CPU over ``seconds`` of steady streaming."""
    rows = daemon.jobs()
    pids = [rows[n]["pid"] for n in names]
    steps0, cpu0 = sum(rows[n]["step"] for n in names), thread_cpu(daemon.pid)
    workers0 = [process_cpu(p) for p in pids]
    started = time.monotonic()
    time.sleep(seconds)
    cpu1, wall = thread_cpu(daemon.pid), time.monotonic() - started
    workers1 = [process_cpu(p) for p in pids]
    rows = daemon.jobs()
    steps = sum(rows[n]["step"] for n in names) - steps0
    cpu = {k: cpu1[k] - cpu0[k] for k in cpu0}
    worker_cpu = sum(b - a for a, b in zip(workers0, workers1, strict=True))
    return {
        "seconds": round(wall, 3), "steps": steps, "steps_per_s": round(steps / wall, 1),
        "daemon_cpu_s": round(cpu["total"], 4), "daemon_main_thread_cpu_s": round(cpu["main"], 4),
        "daemon_zmq_threads_cpu_s": round(cpu["other_threads"], 4),
        "daemon_cpu_fraction": round(cpu["total"] / wall, 5),
        "daemon_cpu_ms_per_1000_msgs": rounded(cpu["total"] * 1e6 / steps if steps else None, 2),
        "worker_cpu_us_per_step": rounded(worker_cpu * 1e6 / steps if steps else None, 1),
        "daemon_cpu_us_per_step": rounded(cpu["total"] * 1e6 / steps if steps else None, 1),
    }


def _fit(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Least squares of daemon CPU/s over steps/s: fixed CPU per second and marginal CPU per message."""
    xs = [r["steps_per_s"] for r in rows]
    ys = [r["daemon_cpu_fraction"] for r in rows]
    n = len(xs)
    if n < 2:
        return {}
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return {}
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    return {"fixed_cpu_fraction": round(my - slope * mx, 5), "marginal_cpu_ms_per_1000_msgs": round(slope * 1e6, 2)}


def sweep(work: Path, window: float, rates: tuple[int, ...] = SWEEP_RATES) -> dict[str, Any]:
    """One synthetic job per rate; daemon CPU per second and per 1000 messages at each."""
    rows = []
    for rate in rates:
        with live_daemon(work / f"rate{rate}", {"s": synthetic_job(rate, window + 60)}) as daemon:
            daemon.wait_streaming(["s"], WARMUP_STEPS, 120)
            rows.append({"rate": rate, **cpu_window(daemon, ["s"], window)})
    return {"rates": rows, **_fit(rows), "window_seconds": window,
            "note": "service-mode mlxsupd, one bench.synthetic job (Session SDK, no MLX work); CPU from /proc"}


def sixteen_jobs(work: Path, window: float, requests: int, rate: int = 100) -> dict[str, Any]:
    """16 jobs configured, 4 running at ``rate`` steps/s: daemon CPU, then control latency under that load."""
    running = [f"job{i:02d}" for i in range(4)]
    jobs = {f"job{i:02d}": synthetic_job(rate, window + 120, autostart=i < 4) for i in range(16)}
    with live_daemon(work, jobs) as daemon:
        daemon.wait_streaming(running, WARMUP_STEPS, 180)
        cpu = cpu_window(daemon, running, window)
        latency = status_latency(daemon.client, requests)
    return {"configured": 16, "running": 4, "rate_per_job": rate, **cpu, **latency}
