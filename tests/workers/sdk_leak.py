"""A Session SDK loop that leaks: it keeps MIB_PER_STEP of touched memory per step for the life of its process.

usage: sdk_leak.py STEPS MIB_PER_STEP [--seconds S]
Under mlxsupd it is recycled from its checkpoints before the budget and reaches STEPS; its state is one counter.
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from worker import Session

parser = argparse.ArgumentParser()
parser.add_argument("steps", type=int)
parser.add_argument("mib", type=float)
parser.add_argument("--seconds", type=float, default=0.02, help="per step")
args = parser.parse_args()

model = nn.Linear(4, 1)
optimizer = optim.SGD(learning_rate=0.1)
mx.eval(model.parameters())
session = Session.from_env(target_steps=args.steps, batch=1)
step = session.resume(model, optimizer).step
kept = []
while step < args.steps:
    block = bytearray(int(args.mib * 2**20))
    block[::4096] = b"\x01" * len(range(0, len(block), 4096))  # touched, so resident
    kept.append(block)
    time.sleep(args.seconds)
    step += 1
    session.end_step(step, 1.0 / step)
session.finish(step)
