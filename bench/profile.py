"""``python -m bench.profile``: where the daemon's CPU goes per telemetry message, by component (needs py-spy).

The daemon runs a job in steady state: ``--worker train`` is the overhead benchmark's supervised arm (the
built-in MLX job, small model, batch 8, no periodic checkpoints), ``--worker synthetic`` the paced Session-SDK
worker of the sweep. ``--mode run`` is ``mlxsupd run`` as the overhead benchmark uses it, ``--mode service`` the
service daemon (control and event sockets; ``--subscriber`` adds a client subscribed to every event).
Over a window of ``--seconds`` the daemon's CPU time is read per thread from /proc, and over a second window as
long py-spy samples the daemon's Python stack (samples blocked in poll are idle and not counted). Each sample is
assigned to one component: by the loop's branch it was taken in (message handling, 20 Hz sampling, heartbeats,
job ticks, hooks, control requests, the poll itself), and inside message handling by its innermost frame (recv,
decode, lifecycle, estimator, policy, job actions, recorder, publish, logging). A component's CPU per message is
the main thread's CPU times its share of the samples, divided by the steps recorded in the window; libzmq's I/O
threads (which read the ipc socket) are reported on their own line.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from bench.common import PYTHON, SMALL, BenchError, Child, short_run_dir
from bench.daemon_cost import LiveDaemon, process_cpu, synthetic_job, thread_cpu
from supervisor.config import write_config

# Branches of the loop, found anywhere in a stack (checked in this order).
BRANCHES = (
    ("Daemon._drain_workers", "message"),
    ("Daemon._sample_all", "sampling (20 Hz, per second)"),
    ("Daemon._heartbeat_all", "heartbeats (per second)"),
    ("Job.tick", "wakeup: job ticks"),
    ("on_turn", "wakeup: turn hooks"),
    ("drain (supervisor/control/server.py", "control requests"),
    ("ControlServer._on_xpub", "event subscriptions"),
    ("Daemon._wait", "wakeup: poll + loop"),
    ("Daemon._turn", "wakeup: poll + loop"),
    ("Daemon.run", "wakeup: poll + loop"),
)
# Inside message handling, the innermost frame of our own code names the component (library frames such as
# zmq, msgpack, json or statistics count for the code that called them): first a function of a file listed in
# LEAF_FUNCTIONS (by name prefix), else the file's component (by path prefix, so "structlog/" is a package).
LEAF_FUNCTIONS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    # <listcomp>: theil_sen's pairwise slopes
    ("supervisor/core/policy.py", ("Estimator", "SlidingTheilSen", "theil_sen", "<listcomp>"), "estimator"),
    ("supervisor/daemon/loop.py", ("Daemon._on_hello",), "job actions"),
)
LEAF_FILES: dict[str, str] = {
    "protocol/messages.py": "decode",
    "supervisor/daemon/recorder.py": "recorder",
    "supervisor/control/server.py": "publish",
    "protocol/control.py": "publish",
    "supervisor/core/policy.py": "policy",
    "supervisor/core/lifecycle.py": "lifecycle",
    "supervisor/core/events.py": "lifecycle",
    "supervisor/daemon/history.py": "job actions",
    "supervisor/daemon/job.py": "job actions",
    "supervisor/daemon/loop.py": "recv",  # getsockopt and recv_multipart, called from _drain_workers
    "structlog/": "logging",
}


def _parse_frame(frame: str) -> tuple[str, str]:
    """``func (file:line)`` -> (func, file)."""
    name, _, rest = frame.partition(" (")
    return name, rest.rsplit(":", 1)[0]


IDLE = "idle (blocked in poll)"


def classify(stack: list[str]) -> str:
    if stack and stack[-1].startswith("Poller.poll ("):
        return IDLE  # py-spy does not always tell a thread blocked in zmq_poll from a running one
    joined = ";".join(stack)
    branch = next((label for marker, label in BRANCHES if marker in joined), "other (start-up, imports, spawn)")
    if branch != "message":
        return branch
    for frame in reversed(stack):
        func, path = _parse_frame(frame)
        for file, prefixes, component in LEAF_FUNCTIONS:
            if path.startswith(file) and func.startswith(prefixes):
                return component
        for prefix, component in LEAF_FILES.items():
            if path.startswith(prefix):
                return component
    return "recv"


def read_raw(path: Path) -> collections.Counter[str]:
    """Samples per component from py-spy's raw (collapsed stack) output."""
    counts: collections.Counter[str] = collections.Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            counts[classify(stack.split(";"))] += int(count)
    return counts


def _step_records(telemetry: Path, start: float, end: float) -> int:
    from supervisor.daemon.recorder import read_records

    return sum(1 for r in read_records(telemetry) if r.get("k") == "step" and start <= r.get("t", 0) <= end)


def _subscriber(endpoint: str, stop: threading.Event, seen: list[int]) -> None:
    import zmq

    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(endpoint)
    try:
        while not stop.is_set():
            if sub.poll(100):
                sub.recv_multipart()
                seen[0] += 1
    finally:
        sub.close()
        context.term()


def profile_window(pid: int, seconds: float, rate: int, out: Path) -> dict[str, Any]:
    """The daemon's per-thread CPU over ``seconds``, then py-spy over as long again.

    Two windows, because py-spy either pauses the process for every sample (exact stacks, but the pauses add
    CPU time to every thread) or reads it while it runs (no added CPU, but stacks caught mid-change land on
    the wrong line): the CPU is read while nothing watches, the shares come from paused, exact samples.
    """
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        raise BenchError("py-spy is not installed (pip install py-spy)")
    cpu0, workers0, started = thread_cpu(pid), _children_cpu(pid), time.time()
    time.sleep(seconds)
    cpu1, workers1, ended = thread_cpu(pid), _children_cpu(pid), time.time()
    argv = [spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", str(rate),
            "--format", "raw", "-o", str(out)]
    code = subprocess.run(argv, capture_output=True, timeout=seconds + 60, check=False).returncode
    if code != 0 or not out.exists():
        raise BenchError(f"py-spy exited {code}")
    worker_cpu = sum(cpu - workers0[child] for child, cpu in workers1.items() if child in workers0)
    return {"start": started, "end": ended, "cpu": {k: cpu1[k] - cpu0[k] for k in cpu0}, "worker_cpu": worker_cpu}


def _children_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each descendant of the daemon (its workers)."""
    return {child.pid: process_cpu(child.pid) for child in psutil.Process(pid).children(recursive=True)}


def table(counts: collections.Counter[str], window: dict[str, Any], steps: int) -> dict[str, Any]:
    idle = counts.pop(IDLE, 0)
    total = sum(counts.values()) or 1
    main, other = window["cpu"]["main"], window["cpu"]["other_threads"]
    seconds = window["end"] - window["start"]
    rows = {name: {"samples": n, "share": round(n / total, 4), "us_per_msg": round(main * n / total * 1e6 / steps, 2),
                   "ms_per_s": round(main * n / total * 1e3 / seconds, 3)}
            for name, n in counts.most_common()}
    rows["recv (libzmq I/O threads)"] = {"samples": None, "share": None,
                                         "us_per_msg": round(other * 1e6 / steps, 2),
                                         "ms_per_s": round(other * 1e3 / seconds, 3)}
    return {"steps": steps, "seconds": round(seconds, 2), "steps_per_s": round(steps / seconds, 1),
            "worker_cpu_us_per_msg": round(window["worker_cpu"] * 1e6 / steps, 1),
            "daemon_cpu_s": round(main + other, 4), "daemon_cpu_us_per_msg": round((main + other) * 1e6 / steps, 2),
            "daemon_cpu_fraction": round((main + other) / seconds, 5), "samples": total, "idle_samples": idle,
            "components": rows}


def render(result: dict[str, Any]) -> str:
    """The component table as text: samples, share, µs per message, ms per second."""
    lines = [f"{result['steps']} steps in {result['seconds']} s ({result['steps_per_s']}/s); daemon CPU "
             f"{result['daemon_cpu_s']} s = {result['daemon_cpu_us_per_msg']} µs/msg, "
             f"{result['daemon_cpu_fraction'] * 100:.2f} % of a core "
             f"(worker: {result['worker_cpu_us_per_msg']} µs/msg); "
             f"{result['samples']} samples "
             f"(+{result['idle_samples']} idle)",
             f"{'component':<34} {'samples':>7} {'share':>6} {'µs/msg':>8} {'ms/s':>7}"]
    for name, row in result["components"].items():
        share = f"{row['share'] * 100:5.1f}%" if row["share"] is not None else "     -"
        lines.append(f"{name:<34} {row['samples'] if row['samples'] is not None else '-':>7} {share} "
                     f"{row['us_per_msg']:>8.1f} {row['ms_per_s']:>7.2f}")
    return "\n".join(lines)


def _job(worker: str, rate: float, steps: int) -> dict[str, Any]:
    if worker == "train":
        return {"budget": "6GiB", "checkpoint_every": 0, "train": {**SMALL, "steps": steps}}
    return synthetic_job(rate, steps / rate)


def run_mode(work: Path, job: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """``mlxsupd run`` (the overhead benchmark's supervised arm), profiled after ``--warmup`` seconds."""
    with short_run_dir() as run_dir:
        config = write_config(work / "mlxsup.toml", {"run_dir": str(run_dir), "state_dir": str(work / "state")},
                              {"j": job})
        argv = [PYTHON, "-m", "supervisor.cli.mlxsupd", "run", "-c", str(config), "j", "--log-format", "json"]
        with open(work / "mlxsupd.log", "ab") as log, Child(argv, stdout=log, stderr=subprocess.STDOUT) as child:
            time.sleep(args.warmup)
            window = profile_window(child.pid, args.seconds, args.rate_hz, work / "pyspy.txt")
            child.stop(60)
    steps = _step_records(work / "state" / "jobs" / "j" / "telemetry.jsonl", window["start"], window["end"])
    return table(read_raw(work / "pyspy.txt"), window, steps)


def service_mode(work: Path, job: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    with short_run_dir() as run_dir:
        daemon = LiveDaemon(run_dir, work, {"j": job})
        stop, seen = threading.Event(), [0]
        thread = threading.Thread(target=_subscriber, args=(daemon.events_endpoint, stop, seen), daemon=True)
        try:
            if args.subscriber:
                thread.start()
            daemon.wait_streaming(["j"], 20, 180)
            window = profile_window(daemon.pid, args.seconds, args.rate_hz, work / "pyspy.txt")
        finally:
            stop.set()
            daemon.close()
    steps = _step_records(work / "state" / "jobs" / "j" / "telemetry.jsonl", window["start"], window["end"])
    result = table(read_raw(work / "pyspy.txt"), window, steps)
    result["events_received"] = seen[0] if args.subscriber else None
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("run", "service"), default="run")
    parser.add_argument("--worker", choices=("train", "synthetic"), default="train")
    parser.add_argument("--rate", type=float, default=1000.0, help="synthetic worker's steps/s")
    parser.add_argument("--subscriber", action="store_true", help="service mode: a client subscribed to all events")
    parser.add_argument("--seconds", type=float, default=30.0, help="profiled window")
    parser.add_argument("--warmup", type=float, default=10.0, help="run mode: seconds before the window opens")
    parser.add_argument("--rate-hz", type=int, default=500, help="py-spy samples per second")
    parser.add_argument("--work", type=Path, default=Path(".bench/profile"))
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    args.work = args.work.resolve()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    steps = int((args.warmup + args.seconds + 120) * (args.rate if args.worker == "synthetic" else 100))
    job = _job(args.worker, args.rate, steps)
    result = (run_mode if args.mode == "run" else service_mode)(args.work, job, args)
    result["setup"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    text = json.dumps(result, indent=1)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
