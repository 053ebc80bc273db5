"""``python -m bench.flood``: a synthetic worker that floods its daemon with step telemetry.

Spawned by the daemon like any worker (its token is in the environment), it says hello, sends ``--messages``
Step frames as fast as ZeroMQ takes them (blocking sends: the high-water mark throttles it to the daemon's
pace), waits ``--linger`` seconds so the daemon can drain its queue, says goodbye and exits 0. Its own send
rate goes to ``--stats`` so the benchmark can tell when the sender, not the daemon, was the bottleneck.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import zmq

from protocol import Goodbye, Hello, Step, encode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.flood")
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--linger", type=float, default=3.0)
    parser.add_argument("--stats", default="")
    args = parser.parse_args(argv)
    endpoint, token = os.environ.get("MLXSUP_ENDPOINT", ""), os.environ.get("MLXSUP_TOKEN", "")
    if not endpoint:
        print("bench.flood: MLXSUP_ENDPOINT is not set (run it under mlxsupd)", file=sys.stderr)
        return 2
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 5000)
    sock.connect(endpoint)
    try:
        sock.send(encode(Hello(token, os.getpid(), os.environ.get("MLXSUP_JOB", "flood"), 0, args.messages, 8, 1)))
        started = time.perf_counter()
        for step in range(1, args.messages + 1):
            sock.send(encode(Step(step, 8, 1, 1.0, 0.001, 1 << 20, 0, 1 << 20, 64 << 20)))
        seconds = time.perf_counter() - started
        if args.stats:
            with open(args.stats, "w", encoding="utf-8") as fh:
                json.dump({"messages": args.messages, "seconds": seconds, "per_second": args.messages / seconds}, fh)
        time.sleep(args.linger)
        sock.send(encode(Goodbye("finished", args.messages)))
    finally:
        sock.close()
        context.term()
    return 0


if __name__ == "__main__":
    sys.exit(main())
