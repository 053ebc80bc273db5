"""``python -m bench.sdk_cost``: what ``Session.end_step`` costs the training loop, supervised vs standalone.

A diagnostic for the overhead ratio: ``--calls`` end_step calls on a standalone session and on one connected
to a ROUTER socket bound here (unbounded receive queue, nothing read, so sends never block or drop), in
alternating blocks. Prints one JSON object: microseconds per call for each and their difference.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import zmq


def _per_call_us(session: object, calls: int, first_step: int) -> float:
    end_step = session.end_step  # type: ignore[attr-defined]
    started = time.perf_counter()
    for step in range(first_step, first_step + calls):
        end_step(step, 1.0)
    return (time.perf_counter() - started) / calls * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sdk_cost")
    parser.add_argument("--calls", type=int, default=5000, help="end_step calls per block")
    parser.add_argument("--blocks", type=int, default=4)
    args = parser.parse_args(argv)
    from worker.session import Session, SessionSettings

    run_dir = Path(tempfile.mkdtemp(prefix="mlxsup-sdk-", dir="/tmp"))
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.RCVHWM, 0)
    router.setsockopt(zmq.LINGER, 0)
    endpoint = f"ipc://{run_dir / 'w.sock'}"
    router.bind(endpoint)
    target = 10 * args.calls * args.blocks
    standalone = Session(SessionSettings(), target_steps=target, batch=8)
    supervised = Session(SessionSettings(endpoint=endpoint, token="x" * 32, orphan_timeout=1e9),
                         target_steps=target, batch=8)
    rows: dict[str, list[float]] = {"standalone_us": [], "supervised_us": []}
    try:
        for block in range(args.blocks):
            first = 1 + block * args.calls
            rows["standalone_us"].append(_per_call_us(standalone, args.calls, first))
            rows["supervised_us"].append(_per_call_us(supervised, args.calls, first))
    finally:
        supervised.close()
        standalone.close()
        router.close()
        context.term()
        (run_dir / "w.sock").unlink(missing_ok=True)
        os.rmdir(run_dir)
    result = {k: round(statistics.median(v), 2) for k, v in rows.items()}
    result["added_us_per_step"] = round(result["supervised_us"] - result["standalone_us"], 2)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
