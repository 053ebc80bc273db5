"""A data-parallel training loop supervised as a gang of ranks (this file is quoted in docs/distributed.md)."""

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from worker import Session

STEPS = 100

mx.random.seed(0)  # the same initial weights on every rank
model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 1))
optimizer = optim.AdamW(learning_rate=1e-2)
true_w = mx.random.normal((16, 1), key=mx.random.key(42))

group = mx.distributed.init()  # the daemon starts every rank with MLX_RANK and MLX_HOSTFILE
session = Session.from_env(target_steps=STEPS, batch=16)  # per rank; the daemon may shrink it
step = session.resume(model, optimizer).step  # on every rank: the newest checkpoint they all hold


def loss_fn(model, x, y):
    return nn.losses.mse_loss(model(x), y)


grad_fn = nn.value_and_grad(model, loss_fn)
while step < STEPS:
    share = session.batch * session.accum  # this rank's share of the step's samples
    x = mx.random.normal((group.size() * share, 16), key=mx.random.key(step))[group.rank() * share:][:share]
    loss, grads = grad_fn(model, x, x @ true_w)
    grads = session.average_gradients(grads)  # the all-reduce, carrying any rank's wish to stop
    optimizer.update(model, grads)
    mx.eval(model.parameters(), optimizer.state, loss)
    step += 1
    session.end_step(step, loss.item())  # every rank acts on the same decision, at the same step
session.finish(step)
