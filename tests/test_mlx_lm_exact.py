"""The mlx-lm job kind is exact: resume is bitwise for LoRA, DoRA and full; micro-batches weigh by tokens.

Real mlx-lm pieces (model loading, LoRA/DoRA layers, datasets, default_loss) on a tiny Llama built offline;
runs are in-process (the supervised, cross-process version is in test_mlx_lm_supervised.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten, tree_map

from tests._mlx_lm import (
    arrays,
    bitwise_equal,
    build_tiny,
    max_abs_difference,
    offline_env,
    train_in_process,
)

pytestmark = pytest.mark.slow
Tiny = tuple[Path, Path]
# Dropout and a warmup + cosine schedule, so the per-step RNG and the restored optimizer step both matter.
EXACT = ["--lora-parameters", '{"rank": 4, "scale": 10.0, "dropout": 0.1}',
         "--lr-schedule", '{"name": "cosine_decay", "arguments": [1e-4, 12], "warmup": 3}']


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    return build_tiny(tmp_path_factory.mktemp("tiny"))


class TestExactResume:
    """12 steps straight equal 5 steps, a new run from the checkpoint, and 7 more, bit for bit."""

    @pytest.mark.parametrize("kind", ["lora", "dora", "full"])
    def test_resumed_run_equals_straight_run_bitwise(self, tiny: Tiny, tmp_path: Path, kind: str) -> None:
        extra = ["--fine-tune-type", kind, *EXACT]
        straight = train_in_process(*tiny, tmp_path / "straight", 12, *extra)
        first = train_in_process(*tiny, tmp_path / "resumed", 5, *extra)
        assert first.step == 5
        resumed = train_in_process(*tiny, tmp_path / "resumed", 12, *extra)
        assert resumed.step == 12
        assert bitwise_equal(arrays(straight), arrays(resumed))
        assert not bitwise_equal(arrays(first), arrays(resumed))  # the last 7 steps did train
        adapters = [mx.load(str(tmp_path / run / "adapters" / "adapters.safetensors")) for run in ("straight",
                                                                                                  "resumed")]
        assert bitwise_equal(*adapters)
        assert set(adapters[0]) == {k.removeprefix("model.") for k in arrays(straight) if k.startswith("model.")}

    def test_resuming_with_another_seed_is_not_exact(self, tiny: Tiny, tmp_path: Path) -> None:
        """Control: the data position and per-step RNG are what make the runs equal."""
        straight = train_in_process(*tiny, tmp_path / "straight", 8, *EXACT)
        train_in_process(*tiny, tmp_path / "resumed", 4, *EXACT)
        resumed = train_in_process(*tiny, tmp_path / "resumed", 8, *EXACT, "--seed", "1")
        assert not bitwise_equal(arrays(straight), arrays(resumed))


class TestTokenWeighting:
    """A step's micro-batches weigh by their tokens: 4x1, 2x2 and 1x4 give the same update."""

    def test_token_counts_are_default_losss(self, tiny: Tiny) -> None:
        from mlx_lm.tuner.trainer import default_loss

        model, batches = self._model_and_batches(tiny)
        for step in range(4):
            for batch in (4, 2, 1):
                for part in batches.micro_batches(step, batch):
                    assert default_loss(model, part.tokens, part.lengths)[1].item() == part.ntokens

    def test_accumulated_gradient_equals_the_whole_batchs(self, tiny: Tiny) -> None:
        from mlx_lm.tuner.trainer import default_loss

        from worker.mlx_lm.trainer import weighted_loss

        model, batches = self._model_and_batches(tiny)
        weighted = nn.value_and_grad(model, weighted_loss)
        plain = nn.value_and_grad(model, default_loss)
        (whole,) = batches.micro_batches(0, 4)
        reference = weighted(model, whole.tokens, whole.lengths, mx.array(1.0))[1]
        halves = batches.micro_batches(0, 2)
        assert halves[0].ntokens != halves[1].ntokens  # else weighting would not matter
        total = sum(h.ntokens for h in halves)
        summed = self._sum([weighted(model, h.tokens, h.lengths, mx.array(h.ntokens / total))[1] for h in halves])
        averaged = tree_map(lambda g: g / 2, self._sum([plain(model, h.tokens, h.lengths)[1] for h in halves]))
        assert self._max_difference(reference, summed) < 1e-5
        assert self._max_difference(reference, averaged) > 1e-3  # mlx-lm's equal weighting is off

    @pytest.mark.parametrize(("batch", "accum"), [(2, 2), (1, 4)])
    def test_batch_change_leaves_the_update_within_1e_5(self, tiny: Tiny, tmp_path: Path, batch: int,
                                                        accum: int) -> None:
        train_in_process(*tiny, tmp_path / "base", 4)
        for run in ("unchanged", "changed"):
            shutil.copytree(tmp_path / "base", tmp_path / run)
        unchanged = train_in_process(*tiny, tmp_path / "unchanged", 5)
        changed = train_in_process(*tiny, tmp_path / "changed", 5, MLXSUP_BATCH=str(batch), MLXSUP_ACCUM=str(accum))
        assert changed.meta["batch"] == batch and changed.meta["accum"] == accum
        assert max_abs_difference(arrays(unchanged), arrays(changed)) <= 1e-5
        assert not bitwise_equal(arrays(unchanged), arrays(changed))  # really another split

    @staticmethod
    def _model_and_batches(tiny: Tiny) -> tuple[nn.Module, Any]:
        from worker.mlx_lm import setup
        from worker.mlx_lm.batches import StepBatches
        from worker.mlx_lm.options import parse

        args = parse(["--model", str(tiny[0]), "--data", str(tiny[1]), "--num-layers", "4"])
        with offline_env():
            model, tokenizer = setup.load_model(args)
            train, _, _ = setup.load_data(args, tokenizer)
        setup.prepare(model, args)
        return model, StepBatches(train, 4, args.max_seq_length, args.seed)

    @staticmethod
    def _sum(trees: list[object]) -> object:
        total = trees[0]
        for tree in trees[1:]:
            total = tree_map(lambda a, b: a + b, total, tree)
        return total

    @staticmethod
    def _max_difference(a: object, b: object) -> float:
        return max(mx.max(mx.abs(x - y)).item() for (_, x), (_, y) in zip(tree_flatten(a), tree_flatten(b),
                                                                             strict=True))
