"""The data of optimizer step ``s`` as a pure function of (seed, effective batch, s), split into micro-batches.

mlx-lm's ``iterate_batches`` shuffles with numpy's global RNG, has no start offset, and shares that RNG with
validation, so a restarted run cannot find its place. Here the data position *is* the optimizer step: the
dataset is cut into fixed chunks of ``effective`` examples (batch × accumulation) in mlx-lm's own order, the
chunks are permuted per epoch by an RNG seeded with (seed, epoch), and step ``s`` takes chunk ``s`` of that
sequence. The daemon may change batch × accum (4×1 → 2×2) but keeps their product, so a step sees the same
examples whatever the split; each micro-batch is padded like mlx-lm's (to 1 + a multiple of 32, at most
``max_seq_length``).

Every micro-batch carries its token count (the positions ``default_loss`` counts), so the step's loss can
weight each micro-batch by its share of the step's tokens: the accumulated gradient is then the gradient of
the per-token mean over the whole step, whatever the split.

In a gang of ``ranks`` ranks the chunk is the whole gang's step and rank ``r`` takes every ``ranks``-th example
of it from the ``r``-th on, as mlx-lm's ``iterate_batches`` shards a batch; ``step_tokens`` counts the tokens of
every rank's micro-batches (from the data alone, no collective), so each rank can weight its micro-batches by
their share of the gang's step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol

import mlx.core as mx
import numpy as np

PAD_TO = 32


class Dataset(Protocol):
    """mlx-lm's CacheDataset: ``dataset[i]`` is (tokens, prompt offset); ``itemlen`` orders the examples."""

    def __getitem__(self, idx: int) -> Any: ...
    def __len__(self) -> int: ...
    def itemlen(self, idx: int) -> int: ...


@dataclasses.dataclass(frozen=True)
class MicroBatch:
    """Token ids (rows padded), per-row (offset, length) as ``default_loss`` takes them, and counted tokens."""

    tokens: mx.array
    lengths: mx.array
    ntokens: int


class StepBatches:
    """Maps optimizer step ``s`` to its examples; see the module docstring."""

    def __init__(self, dataset: Dataset, effective: int, max_seq_length: int, seed: int, rank: int = 0,
                 ranks: int = 1) -> None:
        if effective % ranks:
            raise ValueError(f"a step's {effective} examples do not split over {ranks} ranks")
        if len(dataset) < effective:
            raise ValueError(f"the training set has {len(dataset)} examples, fewer than one optimizer step's "
                             f"batch_size x grad_accumulation_steps = {effective}")
        self.dataset = dataset
        self.effective = effective
        self.max_seq_length = max_seq_length
        self.seed = seed
        self.rank, self.ranks = rank, ranks
        # mlx-lm's grouping: sorted by itemlen, which for its CacheDataset is the length of the raw JSON record
        # (its number of keys), so in practice the file's order.
        order = sorted(range(len(dataset)), key=dataset.itemlen)
        self.chunks = [order[i:i + effective] for i in range(0, len(order) - effective + 1, effective)]
        self._epoch = -1
        self._permutation: np.ndarray[Any, Any] = np.arange(0)

    def examples(self, step: int) -> list[int]:
        """Dataset indices of optimizer step ``step`` (0-based)."""
        epoch, position = divmod(step, len(self.chunks))
        if epoch != self._epoch:
            self._permutation = np.random.default_rng([self.seed, epoch]).permutation(len(self.chunks))
            self._epoch = epoch
        return self.chunks[int(self._permutation[position])]

    def micro_batches(self, step: int, batch: int) -> list[MicroBatch]:
        """This rank's share of step ``step`` split into micro-batches of ``batch`` (which must divide it)."""
        return [self._pad(rows) for rows in self._micro_rows(step, batch, self.rank)]

    def step_tokens(self, step: int, batch: int) -> int:
        """The tokens of step ``step`` over every rank's micro-batches of ``batch`` (what the loss counts)."""
        total = 0
        for rank in range(self.ranks):
            for rows in self._micro_rows(step, batch, rank):
                width, pairs = _shape(rows, self.max_seq_length)
                total += count_tokens(pairs, width)
        return total

    def _micro_rows(self, step: int, batch: int, rank: int) -> list[list[Any]]:
        share = self.effective // self.ranks
        if share % batch:
            raise ValueError(f"batch {batch} does not divide the step's {share} examples of this rank")
        indices = self.examples(step)[rank::self.ranks]
        return [[self.dataset[j] for j in indices[i:i + batch]] for i in range(0, len(indices), batch)]

    def _pad(self, rows: Sequence[Any]) -> MicroBatch:
        tokens = [row[0] for row in rows]
        width, pairs = _shape(rows, self.max_seq_length)
        array = np.zeros((len(rows), width), np.int32)
        for i, row in enumerate(tokens):
            kept = int(pairs[i, 1])
            array[i, :kept] = row[:kept]
        return MicroBatch(mx.array(array), mx.array(pairs), count_tokens(pairs, width))


def _shape(rows: Sequence[Any], max_seq_length: int) -> tuple[int, np.ndarray[Any, Any]]:
    """A micro-batch's padded width (mlx-lm's: 1 + a multiple of 32, at most ``max_seq_length``) and its rows'
    (offset, kept length) pairs."""
    longest = max(len(row[0]) for row in rows)
    width = min(1 + PAD_TO * ((longest + PAD_TO - 1) // PAD_TO), max_seq_length)
    pairs = np.array([(row[1], min(len(row[0]), max_seq_length)) for row in rows], np.int32)
    return width, pairs


def count_tokens(pairs: np.ndarray[Any, Any], width: int) -> int:
    """The target positions ``mlx_lm``'s ``default_loss`` counts for rows (offset, length) of ``width`` tokens:
    positions 1..width-1 that are >= offset and <= length."""
    last = np.minimum(pairs[:, 1], width - 1)
    first = np.maximum(pairs[:, 0], 1)
    return int(np.maximum(last - first + 1, 0).sum())
