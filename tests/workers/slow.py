"""A supervised loop whose steps or evaluations take long: for the keepalive and the orphan watchdog.

usage: slow.py STEPS SECONDS_PER_STEP [--busy SECONDS_AFTER_STEP_1] [--idle SECONDS_AFTER_STEP_1]
  --busy: after step 1, a long "evaluation" inside session.busy(); --idle: the same without it.
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
parser.add_argument("seconds", type=float)
parser.add_argument("--busy", type=float, default=0.0)
parser.add_argument("--idle", type=float, default=0.0)
parser.add_argument("--load", type=float, default=0.0, help="a long model load before the hello, inside busy()")
args = parser.parse_args()

model = nn.Linear(4, 1)
optimizer = optim.SGD(learning_rate=0.1)
mx.eval(model.parameters())
session = Session.from_env(target_steps=args.steps, batch=1)
with session.busy("model_load"):
    time.sleep(args.load)  # without the token-carrying heartbeats, startup_timeout would fire
step = session.resume(model, optimizer).step
while step < args.steps:
    time.sleep(args.seconds)
    step += 1
    if step == 1 and args.busy:
        with session.busy("evaluation"):
            time.sleep(args.busy)
    if step == 1 and args.idle:
        time.sleep(args.idle)
    session.end_step(step, 0.0)
session.finish(step)
