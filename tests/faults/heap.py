"""``python -m tests.faults.heap [--restarts N] [--counts]``: what a service daemon's heap keeps per restart.

Runs the soak's daemon (``tests.faults.soak_parts``: fast-leaking SDK and guard-only jobs, small rotation
settings) in this process, beside the soak's reconnecting control client and event subscriber, a real
``mlxsupctl tail -f`` and a real ``mlxsupctl dashboard`` started over every few seconds. At every ``--every``
restarts it settles the daemon (every job stopped through the control plane, the client processes ended, one
quiet second) and takes its figures: allocated memory blocks, live objects by type, RSS, open fds by kind and
threads; under tracemalloc (the default) a snapshot too. Then the jobs and clients start again. With nothing
running, a bounded daemon's fds and threads are the same at every mark, and its blocks and objects do not grow.

Prints (and writes to ``--out`` as JSON) the figures at each mark and, from the middle mark to the last (past
the warm-up: the bounded records are full by then), the growth per restart: blocks, bytes, object types and,
when traced, the source lines whose allocations grew most. ``--counts`` skips tracemalloc (the daemon runs at
its own speed): tests/test_soak.py is that run.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import psutil

from tests.faults.common import MARK_ENV, Group, Workspace, reap_all, set_subreaper, sweep_orphans
from tests.faults.soak_parts import Shape, tail_loop_argv, write_soak_config

TOP = 25
SETTLE = 1.0  # seconds of a quiet daemon (no worker, no client process) before its figures are taken


class Clients:
    """The client processes beside the daemon, each started over when it ends: the reconnecting control client
    and subscriber (one process), a ``tail -f`` of sdk0's telemetry, a dashboard (its status polls and
    subscription)."""

    def __init__(self, config: Path, root: Path, mark: str) -> None:
        self.argv = {
            "clients": [sys.executable, "-m", "tests.faults.soak_parts", "clients", str(config),
                        str(root / "clients.json")],
            "tail": tail_loop_argv(config, "sdk0"),
            "dashboard": [sys.executable, "-m", "supervisor.cli.mlxsupctl", "-c", str(config), "dashboard",
                          "--port", "0", "--interval", "0.2", "--seconds", "4"],
        }
        self.root, self.mark = root, mark
        self.running: dict[str, Group] = {}
        self.started: collections.Counter[str] = collections.Counter()

    def keep_up(self) -> None:
        for name, argv in self.argv.items():
            group = self.running.get(name)
            if group is None or not group.alive():
                if group is not None:
                    group.kill()
                self.running[name] = Group(argv, self.root / f"{name}.log", self.mark)
                self.started[name] += 1

    def stop(self) -> None:
        for group in self.running.values():
            group.kill()
        self.running.clear()


def fd_kinds() -> dict[str, int]:
    """This process's open fds by kind: a socket, a pipe, an anon inode (epoll, eventfd) or a file's name."""
    kinds: collections.Counter[str] = collections.Counter()
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # the listing's own fd, closed by now
        kind = target.split(":", 1)[0] if target.startswith(("socket:", "pipe:", "anon_inode:")) else target
        kinds[kind if not kind.startswith("/") else Path(kind).name] += 1
    return dict(kinds)


class Profiler:
    """The loop's on_turn wrapped: run, then at each mark settle the daemon, take its figures, start again."""

    def __init__(self, service: Any, clients: Clients, restarts: int, every: int, trace: bool) -> None:
        self.service, self.clients, self.restarts, self.every, self.trace = service, clients, restarts, every, trace
        self.inner = service.on_turn
        self.marks: list[dict[str, Any]] = []
        self.snapshots: list[tracemalloc.Snapshot] = []
        self.types: list[collections.Counter[str]] = []
        self.next_mark = every
        self.most_marks = restarts // every + 2
        self.quiet_since: float | None = None
        self.settling = False
        self.full = False  # every job's in-memory history holds its bound of events (the warm-up is over)
        self.process = psutil.Process()

    def on_turn(self, daemon: Any, now: float) -> None:
        self.inner(daemon, now)
        if daemon.stopping:
            return
        if not self.settling:
            self.clients.keep_up()
            if self._restarts(daemon) >= self.next_mark:
                self.clients.stop()
                self._each_job(daemon, "stop")
                self.settling, self.quiet_since = True, None
            return
        if any(job.busy for job in daemon.jobs.values()):
            self.quiet_since = None
            return
        if self.quiet_since is None:
            self.quiet_since = time.monotonic()
        if time.monotonic() - self.quiet_since < SETTLE:
            return
        self.full = all(len(job.history.events) >= job.history.limit for job in daemon.jobs.values())
        for job in daemon.jobs.values():
            # A job's telemetry file is opened at its next line and closed at a rotation: whether it is open at
            # a mark is chance. Closed (written out) for the figures, it opens again at the next line.
            job.recorder.close()
        self._figures(self._restarts(daemon))
        self.next_mark += self.every
        warm = any(row["histories_full"] for row in self.marks[:-1])
        if self._restarts(daemon) >= self.restarts and (warm or len(self.marks) >= self.most_marks):
            daemon.stopping = True  # (a slow job's history not yet full: a mark or two more, then stop anyway)
            return
        self._each_job(daemon, "start")
        self.settling = False

    @staticmethod
    def _restarts(daemon: Any) -> int:
        return sum(job.stats.restarts for job in daemon.jobs.values())

    def _each_job(self, daemon: Any, command: str) -> None:
        for name in sorted(daemon.jobs):
            self.service.control.dispatch(command, {"job": name})

    def _figures(self, done: int) -> None:
        gc.collect()
        types = collections.Counter(type(o).__name__ for o in gc.get_objects())
        with self.process.oneshot():
            row: dict[str, Any] = {"restarts": done, "blocks": sys.getallocatedblocks(),
                                   "objects": sum(types.values()), "rss_bytes": self.process.memory_info().rss,
                                   "fds": self.process.num_fds(), "threads": self.process.num_threads(),
                                   "fd_kinds": fd_kinds(), "histories_full": self.full}
        if self.trace:
            self.snapshots.append(tracemalloc.take_snapshot())
            row["traced_bytes"] = tracemalloc.get_traced_memory()[0]
        self.types.append(types)
        self.marks.append(row)
        print(f"[heap] {json.dumps(row)}", file=sys.stderr, flush=True)


def growth(profiler: Profiler) -> dict[str, Any]:
    """From the first mark past the warm-up (every job's history full; the middle mark when none is before the
    last) to the last: what grew, per restart."""
    middle = next((i for i, row in enumerate(profiler.marks[:-1]) if row["histories_full"]),
                  (len(profiler.marks) - 1) // 2)
    first, last = profiler.marks[middle], profiler.marks[-1]
    span = max(1, last["restarts"] - first["restarts"])
    types = [{"type": name, "count": n, "per_restart": round(n / span, 4)}
             for name, n in (profiler.types[-1] - profiler.types[middle]).most_common(TOP)]
    report: dict[str, Any] = {
        "from_restarts": first["restarts"], "to_restarts": last["restarts"], "marks": profiler.marks,
        "blocks_per_restart": round((last["blocks"] - first["blocks"]) / span, 4),
        "objects_per_restart": round((last["objects"] - first["objects"]) / span, 4),
        "rss_bytes_per_restart": round((last["rss_bytes"] - first["rss_bytes"]) / span, 2),
        "fds_equal": len({row["fds"] for row in profiler.marks}) == 1,
        "threads_equal": len({row["threads"] for row in profiler.marks}) == 1,
        "types": types, "clients_started": dict(profiler.clients.started)}
    if profiler.trace:
        keep = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen importlib*")]
        before, after = profiler.snapshots[middle], profiler.snapshots[-1]
        stats = after.filter_traces(keep).compare_to(before.filter_traces(keep), "traceback")
        report["lines"] = [{"where": " <- ".join(str(frame) for frame in reversed(s.traceback)),
                            "bytes": s.size_diff, "blocks": s.count_diff,
                            "bytes_per_restart": round(s.size_diff / span, 2)} for s in stats[:TOP] if s.size_diff > 0]
        report["traced_bytes_per_restart"] = round((last["traced_bytes"] - first["traced_bytes"]) / span, 2)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faults.heap", description=__doc__.splitlines()[0])
    parser.add_argument("--restarts", type=int, default=2000, help="restarts in all (default: %(default)s)")
    parser.add_argument("--every", type=int, default=500, help="restarts between marks (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path(".faults/heap.json"), help="JSON report path")
    parser.add_argument("--frames", type=int, default=1, help="frames kept per allocation (default: %(default)s)")
    parser.add_argument("--counts", action="store_true", help="no tracemalloc: blocks, objects, RSS, fds only")
    parser.add_argument("--light", action="store_true",
                        help="the short soak's jobs: one SDK job and five guard-only jobs leaking 4 MiB a step")
    args = parser.parse_args(argv)
    if args.restarts < 2 * args.every or args.every < 1:
        parser.error("--restarts must be at least twice --every (two marks), --every >= 1")
    if args.frames < 1:
        parser.error("--frames must be >= 1")
    from supervisor.config import load_config
    from supervisor.daemon.logs import RotatingFile, configure
    from supervisor.daemon.server import DaemonService

    set_subreaper()
    ws = Workspace()
    area = ws.area("heap")
    shape = LIGHT if args.light else Shape()
    config = load_config(write_soak_config(area, shape))
    configure("json", "info", RotatingFile(area.state_dir / "logs" / "mlxsupd.log", shape.log_max_bytes,
                                           shape.log_keep))
    if not args.counts:
        tracemalloc.start(args.frames)
    service = DaemonService(config)
    # A mark of our own beside the one we inherited (the short soak's): its sweep finds our clients as well.
    clients = Clients(config.path, area.root, " ".join(filter(None, (os.environ.get(MARK_ENV), ws.mark))))
    profiler = Profiler(service, clients, args.restarts, args.every, trace=not args.counts)
    service.on_turn = profiler.on_turn  # type: ignore[method-assign]
    started = time.monotonic()
    try:
        service.serve()
    finally:
        clients.stop()
        sweep_orphans(ws.mark)
        reap_all()
        from tests.faults.soak_parts import disk_bound, disk_used

        disk = {"disk_bytes": disk_used(area.state_dir), "disk_bound_bytes": disk_bound(shape)}
        ws.close()
    report = {"seconds": round(time.monotonic() - started, 1), **disk, **growth(profiler)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


LIGHT = Shape(sdk_jobs=1, guard_jobs=5, log_max_bytes=256 * 1024, sample_interval=0.01, guard_mib=4,
              guard_budget="40MiB")

if __name__ == "__main__":
    sys.exit(main())
