"""``python -m tests.faults.heap [--restarts N]``: what a service daemon's heap keeps per restart.

Runs the soak's daemon (``tests.faults.soak_parts``: fast-leaking SDK and guard-only jobs, small rotation
settings) in this process under tracemalloc, with the soak's reconnecting control client and subscriber beside
it, and takes a snapshot and a count of live objects by type at every ``--every`` restarts. Prints (and writes to
``--out`` as JSON) the source lines whose allocations grew most from the first snapshot to the last, and the
object types whose counts grew: per restart, what the daemon keeps that it should not.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

from tests.faults.common import Group, Workspace, reap_all, set_subreaper, sweep_orphans
from tests.faults.soak_parts import Shape, write_soak_config

TOP = 25


class Profiler:
    """The loop's on_turn wrapped: snapshots at restart marks, and the stop after the last."""

    def __init__(self, service: Any, restarts: int, every: int) -> None:
        self.service, self.restarts, self.every = service, restarts, every
        self.inner = service.on_turn
        self.snapshots: list[tuple[int, tracemalloc.Snapshot, collections.Counter[str]]] = []
        self.next_mark = every

    def on_turn(self, daemon: Any, now: float) -> None:
        self.inner(daemon, now)
        done = sum(job.stats.restarts for job in daemon.jobs.values())
        if done >= self.next_mark and not daemon.stopping:
            gc.collect()
            counts = collections.Counter(type(o).__name__ for o in gc.get_objects())
            self.snapshots.append((done, tracemalloc.take_snapshot(), counts))
            print(f"[heap] {done} restarts: traced {tracemalloc.get_traced_memory()[0]} bytes", file=sys.stderr,
                  flush=True)
            self.next_mark += self.every
        if done >= self.restarts:
            daemon.stopping = True


def growth(profiler: Profiler) -> dict[str, Any]:
    """From the middle snapshot (past the warm-up: the bounded records are full by then) to the last: the lines
    and object types that grew, per restart."""
    middle = profiler.snapshots[(len(profiler.snapshots) - 1) // 2]
    (first, before, counts_before), (last, after, counts_after) = middle, profiler.snapshots[-1]
    span = max(1, last - first)
    keep = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen importlib*")]
    stats = after.filter_traces(keep).compare_to(before.filter_traces(keep), "traceback")
    lines = [{"where": " <- ".join(str(frame) for frame in reversed(s.traceback)), "bytes": s.size_diff,
              "blocks": s.count_diff, "bytes_per_restart": round(s.size_diff / span, 2)}
             for s in stats[:TOP] if s.size_diff > 0]
    types = [{"type": name, "count": n, "per_restart": round(n / span, 4)}
             for name, n in (counts_after - counts_before).most_common(TOP)]
    traced = {done: sum(s.size for s in snap.statistics("filename")) for done, snap, _ in profiler.snapshots}
    return {"from_restarts": first, "to_restarts": last, "traced_bytes": traced,
            "traced_bytes_per_restart": round((traced[last] - traced[first]) / span, 2), "lines": lines,
            "types": types}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faults.heap", description=__doc__.splitlines()[0])
    parser.add_argument("--restarts", type=int, default=2000, help="restarts in all (default: %(default)s)")
    parser.add_argument("--every", type=int, default=500, help="restarts between snapshots (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path(".faults/heap.json"), help="JSON report path")
    parser.add_argument("--frames", type=int, default=1, help="frames kept per allocation (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.restarts < 2 * args.every or args.every < 1:
        parser.error("--restarts must be at least twice --every (two snapshots), --every >= 1")
    from supervisor.config import load_config
    from supervisor.daemon.logs import RotatingFile, configure
    from supervisor.daemon.server import DaemonService

    set_subreaper()
    ws = Workspace()
    area = ws.area("heap")
    shape = Shape()
    config = load_config(write_soak_config(area, shape))
    configure("json", "info", RotatingFile(area.state_dir / "logs" / "mlxsupd.log", shape.log_max_bytes,
                                           shape.log_keep))
    tracemalloc.start(args.frames)
    service = DaemonService(config)
    profiler = Profiler(service, args.restarts, args.every)
    service.on_turn = profiler.on_turn  # type: ignore[method-assign]
    clients = Group([sys.executable, "-m", "tests.faults.soak_parts", "clients", str(config.path),
                     str(area.root / "clients.json")], area.root / "clients.log", ws.mark)
    started = time.monotonic()
    try:
        service.serve()
    finally:
        clients.kill()
        sweep_orphans(ws.mark)
        reap_all()
        ws.close()
    report = {"seconds": round(time.monotonic() - started, 1), **growth(profiler)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
