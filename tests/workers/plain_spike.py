"""A program that knows nothing of mlx-supervisor: flat for a while, then one large allocation at once.

usage: plain_spike.py FLAT_SECONDS MIB [--hold S]
"""

from __future__ import annotations

import argparse
import time

parser = argparse.ArgumentParser()
parser.add_argument("flat", type=float, help="seconds before the allocation")
parser.add_argument("mib", type=float)
parser.add_argument("--hold", type=float, default=10.0, help="seconds to hold it")
args = parser.parse_args()
time.sleep(args.flat)
block = bytearray(int(args.mib * 2**20))
block[::4096] = b"\x01" * len(range(0, len(block), 4096))  # touched, so resident
time.sleep(args.hold)
