"""A small supervised training loop that leaks in one chosen way, for the leak-forensics tests.

usage: leak_shapes.py SHAPE STEPS [--kib N] [--weights FILE] [--seconds S]
  SHAPE: list (a list of (dict of arrays, loss) tuples), dict (arrays keyed by step), attr (a list kept on an
  object), cache (a buffer of a new size every step, freed: MLX's cache grows), bytes (a list of Python bytes),
  none (no leak). --weights: save the final weights there (safetensors).
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from worker import Session

parser = argparse.ArgumentParser()
parser.add_argument("shape", choices=["list", "dict", "attr", "cache", "bytes", "none"])
parser.add_argument("steps", type=int)
parser.add_argument("--kib", type=int, default=512, help="KiB leaked per step")
parser.add_argument("--weights", default="")
parser.add_argument("--seconds", type=float, default=0.0, help="sleep per step")
args = parser.parse_args()


class Tracker:
    def __init__(self) -> None:
        self.kept: list[mx.array] = []


mx.random.seed(0)
model = nn.Linear(64, 64)
optimizer = optim.SGD(learning_rate=0.01)
inputs, targets = mx.random.normal((16, 64)), mx.random.normal((16, 64))
mx.eval(model.parameters(), inputs, targets)


def loss_fn(model: nn.Module, x: mx.array, y: mx.array) -> mx.array:
    return nn.losses.mse_loss(model(x), y)


loss_and_grad = nn.value_and_grad(model, loss_fn)
session = Session.from_env(target_steps=args.steps, batch=1)
step = session.resume(model, optimizer).step
history: list[tuple[dict[str, mx.array], mx.array]] = []
by_step: dict[int, mx.array] = {}
tracker = Tracker()
junk: list[bytes] = []
floats = args.kib * 256  # float32 values in kib KiB
while step < args.steps:
    loss, grads = loss_and_grad(model, inputs, targets)
    optimizer.update(model, grads)
    mx.eval(model.parameters(), optimizer.state, loss)
    step += 1
    if args.shape == "list":
        history.append(({"activations": mx.ones((floats,)) * step}, loss))
        mx.eval(history[-1][0]["activations"])
    elif args.shape == "dict":
        by_step[step] = mx.ones((floats,)) * step
        mx.eval(by_step[step])
    elif args.shape == "attr":
        tracker.kept.append(mx.ones((floats,)) * step)
        mx.eval(tracker.kept[-1])
    elif args.shape == "cache":
        scratch = mx.ones((floats + 1024 * step,))  # a size never seen before: its freed buffer stays cached
        mx.eval(scratch)
        del scratch
    elif args.shape == "bytes":
        junk.append(bytes([step % 251]) * (args.kib * 1024))
    if args.seconds:
        time.sleep(args.seconds)
    session.end_step(step, loss.item())
if args.weights:
    mx.save_safetensors(args.weights, dict(zip(["weight", "bias"], [model.weight, model.bias], strict=True)))
session.finish(step)
