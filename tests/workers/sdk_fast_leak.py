"""A supervised worker that trains almost nothing and leaks fast: a recycle every second or so.

usage: sdk_leak.py STEPS MIB_PER_STEP [--seconds S]

It drives the real Session SDK (resume, hello, ``end_step`` telemetry and commands, a checkpoint of a tiny MLX
model on checkpoint-and-exit, goodbye) and keeps ``MIB_PER_STEP`` MiB of touched Python memory per step, so the
daemon sees a leak and recycles it. A process's steps are counted from the checkpoint it resumed.
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from worker.session import Session

parser = argparse.ArgumentParser()
parser.add_argument("steps", type=int)
parser.add_argument("mib", type=float)
parser.add_argument("--seconds", type=float, default=0.01, help="per step")
args = parser.parse_args()

model = nn.Linear(4, 4)
optimizer = optim.SGD(learning_rate=0.0)
mx.eval(model.parameters())
session = Session.from_env(target_steps=args.steps, batch=8)
step = session.resume(model, optimizer).step
kept = []
while step < args.steps:
    block = bytearray(int(args.mib * 2**20))
    block[::4096] = b"\x01" * len(range(0, len(block), 4096))  # touched, so resident
    kept.append(block)
    time.sleep(args.seconds)
    step += 1
    session.end_step(step, 1.0)
session.finish(step)
