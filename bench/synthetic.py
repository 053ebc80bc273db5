"""``python -m bench.synthetic --rate R --steps N``: a supervised worker that trains nothing.

It drives the real Session SDK (hello, ``end_step`` telemetry with MLX's memory counters, command polling,
the pulse thread, goodbye) at a steady ``--rate`` steps per second, so the daemon's cost per telemetry message
can be measured at a chosen step rate without MLX competing for the cores. Steps are paced against a schedule
(a late step is not made up by sleeping less later than zero). ``--stats`` receives the achieved rate and the
worker's own CPU seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.synthetic", description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=100.0, help="steps per second (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=1000, help="steps to run (default: %(default)s)")
    parser.add_argument("--stats", default="", help="write {steps, seconds, steps_per_second, cpu_seconds} here")
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.steps < 1:
        parser.error("--rate must be > 0 and --steps >= 1")
    from worker.session import Session

    session = Session.from_env(target_steps=args.steps, batch=8)
    interval = 1.0 / args.rate
    started = time.perf_counter()
    cpu_started = time.process_time()
    due = started
    try:
        for step in range(1, args.steps + 1):
            due += interval
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            session.end_step(step, 1.0)
        seconds = time.perf_counter() - started
        if args.stats:
            stats = {"steps": args.steps, "seconds": seconds, "steps_per_second": args.steps / seconds,
                     "cpu_seconds": time.process_time() - cpu_started}
            with open(args.stats, "w", encoding="utf-8") as fh:
                json.dump(stats, fh)
        session.finish(args.steps)
    finally:
        session.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
