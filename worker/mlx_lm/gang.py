"""An mlx-lm fine-tune across ranks, as ``mlx.launch ... mlx_lm.lora`` runs it, under the gang's stop flags.

mlx-lm's own distributed training: ``batch_size`` is the whole gang's batch, rank ``r`` takes every ranks-th
example of it (``iterate_batches`` with the world group), gradients are averaged with
``mlx.nn.average_gradients`` before each update, validation losses and token counts are summed over the ranks,
and rank 0 writes the adapters. Here the same, with three changes for supervision:

- the gradient all-reduce goes through ``Session.average_gradients``, so every rank's wish to checkpoint or exit
  rides in it and all ranks stop at the same step (``worker.gang``);
- the checkpoint is the gang's (each rank's own state, the writer's adapters and optimizer state), and the
  adapter files are written once per host (by the daemon's writer rank), not only on rank 0's host;
- the daemon's ``batch`` of a gang is per rank (as for the built-in job): ``batch_size / ranks``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import mlx.core as mx

from worker.gang import Gang
from worker.session import Session

INJECT_RANK = "MLXSUP_INJECT_RANK"  # only this rank injects the test faults (default: every rank)


def world_size(env: Mapping[str, str]) -> int:
    """The ranks of the gang this process is in (1 alone): the daemon's ``MLXSUP_RANKS``, else MLX's group
    (ranks started by hand or by ``mlx.launch`` with ``MLX_RANK`` and ``MLX_HOSTFILE``)."""
    gang = Gang.from_env(env)
    if gang is None:
        return 1
    return gang.size or int(gang.group.size())


def per_rank_batch(batch_size: int, ranks: int) -> int:
    """Each rank's share of mlx-lm's ``batch_size``; ValueError when it does not split evenly (mlx-lm's rule)."""
    if batch_size % ranks:
        raise ValueError(f"batch_size {batch_size} does not split over {ranks} ranks: mlx-lm gives each rank "
                         f"batch_size / ranks examples of every batch; use a multiple of {ranks}")
    return batch_size // ranks


def injects_faults(session: Session) -> bool:
    """Whether this process injects the test faults: every process, or only rank ``MLXSUP_INJECT_RANK``."""
    wanted = os.environ.get(INJECT_RANK, "")
    if not wanted or session.gang is None:
        return True
    return str(session.gang.rank) == wanted.strip()


def writes_files(session: Session) -> bool:
    """Whether this rank writes the adapter files and adapter_config.json: one rank per host (or alone)."""
    return session.gang is None or session.gang.writer


def rank_of(session: Session) -> tuple[int, int]:
    """(rank, ranks) of this process (0, 1 alone)."""
    if session.gang is None:
        return 0, 1
    return session.gang.rank, int(session.gang.group.size())


class GangReducer:
    """The trainer's collectives over the session's gang (``trainer.Reducer``), each marked as a collective so a
    rank blocked in one (a peer stopped, lost or deadlocked) is reported as such."""

    def __init__(self, session: Session) -> None:
        assert session.gang is not None  # built only for a gang
        self.session = session
        self.gang = session.gang
        self.ranks = int(session.gang.group.size())

    def average(self, grads: Any) -> Any:
        return self.session.average_gradients(grads)

    def total(self, values: mx.array) -> mx.array:
        with self.session.collective("all_sum"):
            summed = mx.distributed.all_sum(values, group=self.gang.group)
            mx.eval(summed)
        return summed
