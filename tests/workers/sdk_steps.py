"""A supervised worker with a very long life of trivial steps: what the SDK itself keeps per step.

usage: sdk_steps.py STEPS STATS_JSON [--every N]

It trains nothing and allocates nothing of its own per step, so whatever its RSS gains over the life is the
SDK's (held rows, the pulse thread, the socket and its queues). Every ``--every`` steps it notes its RSS, open
fds and threads; at the end it writes them to STATS_JSON and finishes (checkpoint: none, no model attached).
"""

from __future__ import annotations

import argparse
import json
import os
import threading

from protocol.footprint import self_footprint
from worker.session import Session

parser = argparse.ArgumentParser()
parser.add_argument("steps", type=int)
parser.add_argument("stats")
parser.add_argument("--every", type=int, default=10_000)
args = parser.parse_args()


def rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


session = Session.from_env(target_steps=args.steps, batch=8)
notes = []
for step in range(1, args.steps + 1):
    session.end_step(step, 1.0)
    if step % args.every == 0:
        notes.append({"step": step, "rss_bytes": rss() if os.path.exists("/proc/self/statm") else self_footprint(),
                      "fds": len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else -1,
                      "threads": threading.active_count()})
with open(args.stats, "w", encoding="utf-8") as handle:
    json.dump(notes, handle)
session.finish(args.steps)
