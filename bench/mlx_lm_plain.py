"""``python -m bench.mlx_lm_plain``: mlx-lm's own trainer exactly as ``mlx_lm.lora --train`` runs it, timed by
mlx-lm's own report callback (iterations/s over its ``train_time``, which leaves out validation, batching and
saves; the first report window, which compiles, is left out too) for the benchmark's supervised ÷ plain ratio.
Writes ``{iterations, seconds, iterations_per_second, cpu_seconds}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.mlx_lm_plain", description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON result")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="an mlx_lm.lora option, e.g. iters=200 (repeatable)")
    args = parser.parse_args(argv)
    import numpy as np
    from mlx_lm import lora
    from mlx_lm.tuner.datasets import load_dataset
    from mlx_lm.tuner.trainer import TrainingCallback
    from mlx_lm.utils import load

    options: dict[str, Any] = {**lora.CONFIG_DEFAULTS, "train": True}
    for item in args.set:
        key, _, value = item.partition("=")
        options[key] = json.loads(value)
    namespace = types.SimpleNamespace(**options)

    class Timing(TrainingCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.iterations = 0
            self.seconds = 0.0
            self.last = 0

        def on_train_loss_report(self, info: dict[str, Any]) -> None:
            done = info["iteration"] - self.last  # train() divides steps_per_report by its window's time
            self.last = info["iteration"]
            if self.last > namespace.steps_per_report:  # the first window compiles (the worker skips it too)
                self.iterations += done
                self.seconds += namespace.steps_per_report / info["iterations_per_second"]

    np.random.seed(namespace.seed)  # what lora.run does before loading
    model, tokenizer = load(namespace.model)
    train_set, valid_set, _ = load_dataset(namespace, tokenizer)
    timing = Timing()
    cpu = time.process_time()
    lora.train_model(namespace, model, train_set, valid_set, training_callback=timing)
    args.out.write_text(json.dumps({"iterations": timing.iterations, "seconds": timing.seconds,
                                    "iterations_per_second": timing.iterations / timing.seconds,
                                    "cpu_seconds": time.process_time() - cpu}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
