"""Helpers of the mlx-lm job kind's tests: the tiny model, in-process runs, checkpoint comparison."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest

from tests.test_checkpoint import same_bits
from worker.checkpoint import Checkpoint, load_latest

# A LoRA fine-tune of every layer of the tiny model; lr 1e-4, ten times mlx-lm's default (a common LoRA rate).
BASE_OPTIONS = ["--num-layers", "4", "--learning-rate", "1e-4", "--val-batches", "2", "--steps-per-eval", "10"]


@contextmanager
def offline_env(**env: str) -> Iterator[None]:
    """No daemon settings from outside, Hugging Face offline, plus ``env``, for an in-process run."""
    with pytest.MonkeyPatch.context() as patch:
        for name in [k for k in os.environ if k.startswith("MLXSUP_")]:
            patch.delenv(name)
        patch.setenv("HF_HUB_OFFLINE", "1")
        for name, value in env.items():
            patch.setenv(name, value)
        yield


def build_tiny(directory: Path) -> tuple[Path, Path]:
    from worker.mlx_lm.tiny import build

    with offline_env():
        return build(directory)


def train_in_process(model: Path, data: Path, out: Path, iters: int, *extra: str, **env: str) -> Checkpoint:
    """Run ``python -m worker.mlx_lm``'s training in this process, checkpointing into ``out/ckpt``; return the
    newest checkpoint."""
    from worker.mlx_lm.options import parse
    from worker.mlx_lm.run import run

    args = parse(["--model", str(model), "--data", str(data), "--iters", str(iters), "--adapter-path",
                  str(out / "adapters"), *BASE_OPTIONS, *extra])
    with offline_env(MLXSUP_CHECKPOINT_DIR=str(out / "ckpt"), **env):
        run(args)
    loaded = load_latest(out / "ckpt")
    assert loaded is not None
    return loaded


def arrays(checkpoint: Checkpoint) -> dict[str, Any]:
    """Trainable parameters and optimizer state of a checkpoint, in one dict."""
    return {**{f"model.{k}": v for k, v in checkpoint.model.items()},
            **{f"optimizer.{k}": v for k, v in checkpoint.optimizer.items()}}


def max_abs_difference(a: dict[str, Any], b: dict[str, Any]) -> float:
    assert a.keys() == b.keys()
    return max(mx.max(mx.abs(a[k].astype(mx.float32) - b[k].astype(mx.float32))).item() for k in a)


def bitwise_equal(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Same names, and each array the same bits (not only equal values: -0.0 is not 0.0), dtype and shape."""
    return a.keys() == b.keys() and all(same_bits(a[k], b[k]) for k in a)
