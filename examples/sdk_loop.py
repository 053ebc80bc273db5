"""A complete training loop supervised through the Session SDK (this file is quoted in docs/sdk.md)."""

import sys
import time

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from worker import Session

STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 200  # total steps; optional argument
PAUSE = float(sys.argv[2]) / 1000 if len(sys.argv) > 2 else 0.0  # optional: ms more per step, as a bigger model

mx.random.seed(0)
model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 1))
optimizer = optim.AdamW(learning_rate=1e-2)
true_w = mx.random.normal((16, 1), key=mx.random.key(42))

# The daemon sets the batch (it may shrink it) and the checkpoint directory through the environment.
session = Session.from_env(target_steps=STEPS, batch=32)
step = session.resume(model, optimizer).step  # 0 on a fresh run, else the last good checkpoint


def loss_fn(model, x, y):
    return nn.losses.mse_loss(model(x), y)


grad_fn = nn.value_and_grad(model, loss_fn)
while step < STEPS:
    x = mx.random.normal((session.batch * session.accum, 16), key=mx.random.key(step))  # data by step
    loss, grads = grad_fn(model, x, x @ true_w)
    optimizer.update(model, grads)
    mx.eval(model.parameters(), optimizer.state, loss)
    time.sleep(PAUSE)
    step += 1
    session.end_step(step, loss.item())  # telemetry + commands; may checkpoint and exit here
session.finish(step)
