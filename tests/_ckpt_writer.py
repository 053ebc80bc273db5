"""Subprocess for the crash-safety test: save large checkpoints forever until SIGKILLed.

Usage: ``python _ckpt_writer.py DIRECTORY FLOATS``. Prints ``ready`` once mlx is loaded, then ``saved STEP``
after every save. Every step is saved twice so the replace-an-existing-step path is killed too. Each array is
filled with the step number so the test can check a loaded checkpoint is internally consistent.
"""

from __future__ import annotations

import sys
from itertools import count
from pathlib import Path

import mlx.core as mx

from protocol.checkpoints import latest_step
from worker.checkpoint import save_checkpoint


def main() -> None:
    directory, floats = Path(sys.argv[1]), int(sys.argv[2])
    base = (latest_step(directory) or 0) + 1
    print("ready", flush=True)
    for i in count():
        step = base + i // 2
        model = {"layer.weight": mx.full((floats,), float(step)), "layer.bias": mx.full((7,), float(step))}
        optimizer = {"state.m": mx.full((floats // 2,), float(step)), "step": mx.array(step, dtype=mx.uint64)}
        mx.eval(model, optimizer)
        save_checkpoint(directory, step, model, optimizer, {"writer": "crash-test"}, keep=2)
        print("saved", step, flush=True)


if __name__ == "__main__":
    main()
