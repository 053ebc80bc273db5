"""The supervised training loop: one optimizer step at a time, resumable bit for bit.

Why not ``mlx_lm.tuner.trainer.train``: it builds its batch iterator from numpy's global RNG with no start
offset, averages micro-batches with equal weight, and gives its callbacks neither the model nor the optimizer,
so it can neither checkpoint nor resume exactly. This loop keeps mlx-lm's math (its ``default_loss``, a
compiled step with the model, optimizer and RNG state as inputs and outputs, its cache clearing) and changes
what exactness needs:

- the data of step ``s`` is fixed by (seed, batch × accum, s) (``batches.StepBatches``);
- the RNG is re-seeded from (seed, s) at each step, so dropout needs no saved key;
- micro-batches are weighted by their share of the step's tokens, so a batch × accum change (4×1 → 2×2)
  gives the same update up to float rounding;
- the checkpoint holds the trainable parameters and the optimizer state (its step drives the schedule).

In a gang (a ``Reducer``) each rank runs its shard of the step's micro-batches, weighted by their share of the
whole gang's tokens, then averages the gradients over the ranks as mlx-lm's trainer does
(``mlx.nn.average_gradients``, through the Session so the gang's stop flags ride in the same all-reduce), and
applies the update in a second compiled function; validation sums loss and tokens over the ranks.
"""

from __future__ import annotations

import dataclasses
import time
import types
from functools import partial
from typing import Any, Protocol, cast

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_map
from mlx_lm.tuner.trainer import default_loss, grad_checkpoint

from worker.mlx_lm.batches import MicroBatch, StepBatches
from worker.mlx_lm.setup import save_adapters


def step_seed(seed: int, step: int) -> int:
    """The RNG seed of optimizer step ``step``: a pure function of (seed, step)."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1, np.uint64)[0])


def weighted_loss(model: nn.Module, tokens: mx.array, lengths: mx.array, weight: mx.array) -> tuple[mx.array, ...]:
    """mlx-lm's per-token mean loss of one micro-batch, scaled by its share of the step's tokens; summed over
    the step's micro-batches it is the per-token mean of the whole step."""
    loss, ntokens = default_loss(model, tokens, lengths)
    return loss * weight, ntokens


class Reducer(Protocol):
    """The gang's collectives as the trainer needs them (``run.GangReducer``)."""

    ranks: int

    def average(self, grads: Any) -> Any:
        """The gradients averaged over the ranks (the all-reduce that carries the stop flags)."""

    def total(self, values: mx.array) -> mx.array:
        """``values`` summed over the ranks, evaluated."""


@dataclasses.dataclass
class StepResult:
    """One optimizer step: its loss (per-token mean over the step), tokens and seconds."""

    loss: float
    tokens: int
    seconds: float


class Trainer:
    """The compiled step and the validation pass of one worker life (built after the checkpoint is loaded)."""

    def __init__(self, model: nn.Module, optimizer: optim.Optimizer, args: types.SimpleNamespace,
                 batches: StepBatches, clear_threshold: int, reducer: Reducer | None = None) -> None:
        self.model, self.optimizer, self.args = model, optimizer, args
        self.batches = batches
        self.reducer = reducer
        self.clear_threshold = clear_threshold
        if args.grad_checkpoint:
            grad_checkpoint(model.layers[0])
        # Built now, after resume replaced optimizer.state: the compiled step captures these objects.
        self.state = [model.state, optimizer.state, mx.random.state]
        loss_and_grad = nn.value_and_grad(model, weighted_loss)

        @partial(mx.compile, inputs=self.state, outputs=self.state)
        def micro_step(tokens: mx.array, lengths: mx.array, weight: mx.array, previous: Any,
                       update: bool) -> tuple[mx.array, mx.array, Any]:
            (loss, ntokens), grad = loss_and_grad(model, tokens, lengths, weight)
            if previous is not None:
                grad = tree_map(lambda a, b: a + b, grad, previous)
            if update:
                optimizer.update(model, grad)
                grad = None
            return loss, ntokens, grad

        @partial(mx.compile, inputs=self.state, outputs=self.state)
        def apply(grad: Any) -> None:
            optimizer.update(model, grad)

        self._micro_step = micro_step
        self._apply = apply

    def clear_cache(self) -> None:
        """mlx-lm's rule: clear MLX's cache when it holds more than the threshold (0: after every batch)."""
        if mx.get_cache_memory() > self.clear_threshold:
            mx.clear_cache()

    def step(self, step: int, batch: int) -> StepResult:
        """Run optimizer step ``step`` (0-based) in micro-batches of ``batch``."""
        started = time.perf_counter()
        mx.random.seed(step_seed(self.args.seed, step))
        micro = self.batches.micro_batches(step, batch)
        own = sum(m.ntokens for m in micro)
        reducer = self.reducer
        # In a gang: weights of the gang's step (ranks x share of its tokens), so the average is its mean.
        scale, total = (1, own) if reducer is None else (reducer.ranks, self.batches.step_tokens(step, batch))
        loss = mx.array(0.0)
        grad = None
        for index, part in enumerate(micro):
            weight = mx.array(scale * part.ntokens / total, mx.float32)
            last = index == len(micro) - 1 and reducer is None
            value, _, grad = self._micro_step(part.tokens, part.lengths, weight, grad, last)
            loss = loss + value
            mx.eval(self.state, loss, grad)
            self.clear_cache()
        if reducer is not None:
            self._apply(reducer.average(grad))
            mx.eval(self.state)
        return StepResult(cast(float, loss.item()), own, time.perf_counter() - started)

    def evaluate(self, batches: StepBatches, count: int, batch: int) -> float:
        """Per-token mean loss over the first ``count`` chunks of ``batches`` (-1: all), in micro-batches of
        ``batch``: the same examples whatever the daemon's batch, so values stay comparable after a shrink."""
        self.model.eval()
        chunks = len(batches.chunks) if count < 0 else min(count, len(batches.chunks))
        total_loss, total_tokens = mx.array(0.0), 0
        for index in range(chunks):
            for part in batches.micro_batches(index, batch):
                total_loss = total_loss + self._loss_sum(part)
                total_tokens += part.ntokens
                mx.eval(total_loss)
                self.clear_cache()
        self.model.train()
        if self.reducer is not None:  # each rank evaluated its shard: sum over the gang, as mlx-lm's evaluate
            summed = cast(list[float], self.reducer.total(mx.stack([total_loss, mx.array(float(total_tokens))]))
                          .tolist())
            return summed[0] / max(summed[1], 1)
        return cast(float, total_loss.item()) / max(total_tokens, 1)

    def _loss_sum(self, part: MicroBatch) -> mx.array:
        loss, ntokens = default_loss(self.model, part.tokens, part.lengths)
        return loss * ntokens  # type: ignore[no-any-return]

    def save(self, iteration: int | None) -> None:
        save_adapters(self.model, self.args, iteration)
