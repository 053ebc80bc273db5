"""A supervised worker whose lives are a few fast steps each: the daemon must record every life's last frames.

usage: short_lives.py STEPS PER_LIFE

Each life resumes a tiny model from its newest checkpoint, reports PER_LIFE steps, then asks itself to leave
(SIGTERM, as a service manager would): at its next step boundary the SDK saves, flushes its held steps, says
goodbye and exits 75 at once (``os._exit``), so the daemon starts the next life. The life that reaches STEPS
finishes (goodbye "finished", exit 0). Its frames and its exit race each other to the daemon.
"""

from __future__ import annotations

import os
import signal
import sys

import mlx.nn as nn
import mlx.optimizers as optim

from worker.session import Session

steps, per_life = int(sys.argv[1]), int(sys.argv[2])
model = nn.Linear(2, 2)
optimizer = optim.SGD(learning_rate=0.1)
session = Session.from_env(target_steps=steps, batch=4)
step = session.resume(model, optimizer).step
last = min(steps, step + per_life)
while step < last:
    step += 1
    if step == last and step < steps:
        os.kill(os.getpid(), signal.SIGTERM)  # this end_step saves, says goodbye and exits 75
    session.end_step(step, 1.0 / step)
session.finish(step)
