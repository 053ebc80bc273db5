"""Resume is exact: N steps straight equal N steps with a restart in the middle, bitwise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from tests.conftest import SMALL
from worker.checkpoint import load_latest

ARGS = [f"--{k}={v}" for k, v in SMALL.items()] + ["--batch=4", "--seed=7"]


def train(checkpoint_dir: Path, steps: int, *extra: str) -> None:
    argv = [sys.executable, "-m", "worker", f"--steps={steps}", f"--checkpoint-dir={checkpoint_dir}", *ARGS, *extra]
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("MLXSUP_")}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr


def weights(checkpoint_dir: Path) -> dict[str, mx.array]:
    loaded = load_latest(checkpoint_dir)
    assert loaded is not None
    return {**loaded.model, **{f"opt.{k}": v for k, v in loaded.optimizer.items()}}


@pytest.mark.slow
class TestExactResume:
    """Real worker processes, real MLX training, real checkpoint files."""

    def test_restart_in_the_middle_gives_identical_weights(self, tmp_path: Path) -> None:
        train(tmp_path / "straight", 12)
        train(tmp_path / "resumed", 5)
        train(tmp_path / "resumed", 12)
        straight, resumed = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
        assert straight.keys() == resumed.keys()
        for name in straight:
            assert mx.array_equal(straight[name], resumed[name]).item(), name
        assert load_latest(tmp_path / "resumed").step == 12  # type: ignore[union-attr]

    def test_a_different_seed_gives_different_weights(self, tmp_path: Path) -> None:
        train(tmp_path / "a", 3)
        train(tmp_path / "b", 3, "--seed=8")
        a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
        assert not all(mx.array_equal(a[n], b[n]).item() for n in a)
