"""``python -m bench.census_cost --out FILE [--tiny DIR]``: what one census count costs, in milliseconds.

A census count (``worker.census.count``) walks the names of the frame that calls ``end_step``. Here that frame
is ``_loop`` below, holding what a training loop holds: the model, its optimizer after a step (so its state is
full), a batch, the loss and the gradients. Timed for the built-in model (``worker.lm.ByteLM`` at its default
size, AdamW) and, with ``--tiny``, the tiny mlx-lm Llama (``worker.mlx_lm.tiny``). Median over ``--repeats``.
Writes ``{model: {ms, ms_min, arrays, array_mib, visited}}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any


def _loop(model: Any, optimizer: Any, batch: Any, repeats: int) -> dict[str, Any]:
    """One optimizer step, then ``repeats`` counts of this frame's names."""
    import mlx.core as mx
    import mlx.nn as nn

    from worker.census import count

    def loss_fn(model: Any, tokens: Any) -> Any:
        logits = model(tokens[:, :-1])
        return nn.losses.cross_entropy(logits, tokens[:, 1:]).mean()

    loss, grads = nn.value_and_grad(model, loss_fn)(model, batch)
    optimizer.update(model, grads)
    mx.eval(model.parameters(), optimizer.state, loss)
    frame = sys._getframe()
    times, last = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        last = count(frame, 1, model, optimizer)
        times.append((time.perf_counter() - started) * 1000)
    assert last is not None
    return {"ms": round(statistics.median(times), 3), "ms_min": round(min(times), 3), "arrays": last.arrays,
            "array_mib": round(last.array_bytes / 2**20, 2), "visited": last.visited, "repeats": repeats}


def builtin(repeats: int) -> dict[str, Any]:
    import mlx.core as mx
    import mlx.optimizers as optim

    from worker.lm import ByteLM, ModelConfig

    config = ModelConfig()
    model = ByteLM(config)
    batch = mx.random.randint(0, 256, (8, config.context + 1))
    return _loop(model, optim.AdamW(learning_rate=1e-3), batch, repeats)


def tiny_mlx_lm(directory: Path, repeats: int) -> dict[str, Any]:
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm.utils import load

    from worker.mlx_lm.tiny import build

    model_dir, _ = build(directory)
    model, _tokenizer = load(str(model_dir))
    batch = mx.random.randint(0, 20, (4, 33))
    return _loop(model, optim.Adam(learning_rate=1e-4), batch, repeats)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.census_cost", description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", type=Path, default=None, help="build the tiny mlx-lm model here and time it too")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args(argv)
    result = {"builtin": builtin(args.repeats)}
    if args.tiny is not None:
        result["tiny_mlx_lm"] = tiny_mlx_lm(args.tiny, args.repeats)
    args.out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
