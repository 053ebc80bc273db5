"""A program that knows nothing of mlx-supervisor: it allocates and touches memory step after step.

usage: plain_leak.py STEPS MIB_PER_STEP [--seconds S] [--ignore-term] [--hold S]
"""

from __future__ import annotations

import argparse
import signal
import time

parser = argparse.ArgumentParser()
parser.add_argument("steps", type=int)
parser.add_argument("mib", type=float)
parser.add_argument("--seconds", type=float, default=0.1, help="per step")
parser.add_argument("--ignore-term", action="store_true")
parser.add_argument("--hold", type=float, default=0.0, help="seconds to sleep after the last step")
args = parser.parse_args()
if args.ignore_term:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
kept = []
for step in range(1, args.steps + 1):
    block = bytearray(int(args.mib * 2**20))
    block[::4096] = b"\x01" * len(range(0, len(block), 4096))  # touched, so resident
    kept.append(block)
    print(f"step {step}", flush=True)
    time.sleep(args.seconds)
time.sleep(args.hold)
