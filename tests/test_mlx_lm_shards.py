"""An mlx-lm fine-tune's shards in a gang: each rank's part of a step, the batch per rank, and bad splits named."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from supervisor.config import ConfigError, load_config, write_config

pytest.importorskip("mlx_lm")

TOTAL = 16 << 30


class Rows:
    """A stand-in for mlx-lm's CacheDataset (the Dataset protocol): ``count`` rows of varying length."""

    def __init__(self, count: int) -> None:
        self.rows = [(list(range(1, 3 + (7 * i) % 40)), i % 3) for i in range(count)]

    def __getitem__(self, idx: int) -> Any:
        return self.rows[idx]

    def __len__(self) -> int:
        return len(self.rows)

    def itemlen(self, idx: int) -> int:
        return 1


class TestShards:
    """Rank r takes every ranks-th example of the gang's step (mlx-lm's iterate_batches), nothing twice."""

    @pytest.mark.parametrize("ranks, batch", [(2, 1), (2, 2), (4, 1)])
    def test_the_ranks_shards_partition_the_single_process_step(self, ranks: int, batch: int) -> None:
        from worker.mlx_lm.batches import StepBatches

        data = Rows(40)
        alone = StepBatches(data, 8, 64, 7)
        shards = [StepBatches(data, 8, 64, 7, rank, ranks) for rank in range(ranks)]
        for step in (0, 3, 9):  # 9: the second epoch, another permutation
            whole = alone.examples(step)
            for shard in shards:
                assert shard.examples(step) == whole  # every rank knows the gang's step
                rows = sum((part.tokens.shape[0] for part in shard.micro_batches(step, batch)), 0)
                assert rows == 8 // ranks
            tokens = [sum(part.ntokens for part in shard.micro_batches(step, batch)) for shard in shards]
            # step_tokens counts every rank's micro-batches, from the data alone: what the weights divide by
            assert all(shard.step_tokens(step, batch) == sum(tokens) for shard in shards)
            assert sum(tokens) == sum(part.ntokens for part in alone.micro_batches(step, batch * ranks))

    def test_rank_r_takes_every_ranks_th_example_from_the_r_th(self) -> None:
        from worker.mlx_lm.batches import StepBatches

        data = Rows(16)
        shards = [StepBatches(data, 8, 64, 1, rank, 2) for rank in range(2)]
        whole = shards[0].examples(2)
        for rank, shard in enumerate(shards):
            [part] = shard.micro_batches(2, 4)
            expected = [data[j][0] for j in whole[rank::2]]
            rows = part.tokens.tolist()
            assert [row[:len(e)] for row, e in zip(rows, expected, strict=True)] == expected
            assert all(not any(row[len(e):]) for row, e in zip(rows, expected, strict=True))  # padding

    def test_a_share_the_batch_does_not_divide_is_refused(self) -> None:
        from worker.mlx_lm.batches import StepBatches

        with pytest.raises(ValueError, match="do not split over 3 ranks"):
            StepBatches(Rows(20), 8, 64, 0, 0, 3)
        with pytest.raises(ValueError, match="batch 3 does not divide the step's 4 examples of this rank"):
            StepBatches(Rows(20), 8, 64, 0, 1, 2).micro_batches(0, 3)


def gang_config(tmp_path: Path, batch_size: int, **job: Any) -> Path:
    table = {"ranks": 2, "budget": "1GiB", "mlx_lm": {"model": "org/model", "batch_size": batch_size}, **job}
    return write_config(tmp_path / "c.toml", {"run_dir": "/tmp/mlxsup-x", "state_dir": str(tmp_path)}, {"j": table})


class TestGangConfig:
    """ranks, hosts and hostfile apply to the mlx_lm kind; its batch is per rank."""

    def test_batch_is_per_rank(self, tmp_path: Path) -> None:
        config = load_config(gang_config(tmp_path, 8), total_memory=TOTAL)
        assert config.jobs["j"].batch == 4 and config.jobs["j"].mlx_lm["batch_size"] == 8
        layout = config.layout("j")
        assert layout is not None and layout.world == 2

    def test_a_hostfile_counts_every_rank(self, tmp_path: Path) -> None:
        (tmp_path / "hosts.json").write_text(json.dumps([{"ssh": "here", "ips": ["127.0.0.1"]}] * 4))
        config = load_config(gang_config(tmp_path, 8, hostfile="hosts.json"), total_memory=TOTAL)
        assert config.jobs["j"].batch == 2  # mlx.launch's hostfile of 4 ranks: 2 examples each

    def test_a_batch_size_that_does_not_split_is_named(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match=r"mlx_lm\.batch_size = 6 does not split over the gang's 4 ranks"):
            load_config(gang_config(tmp_path, 6, ranks=4), total_memory=TOTAL)

    def test_a_single_rank_keeps_the_whole_batch(self, tmp_path: Path) -> None:
        assert load_config(gang_config(tmp_path, 6, ranks=1), total_memory=TOTAL).jobs["j"].batch == 6


def test_a_rank_started_by_hand_refuses_a_batch_that_does_not_split() -> None:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLXSUP_")}, "MLX_RANK": "0",
           "MLXSUP_RANKS": "3"}
    done = subprocess.run([sys.executable, "-m", "worker.mlx_lm", "--model", "m", "--batch-size", "4"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2
    assert "batch_size 4 does not split over 3 ranks" in done.stderr
