"""Data-parallel gangs in the SDK: every rank stops, checkpoints and resumes at the same step.

A rank's reason to stop (the daemon's checkpoint-and-exit, an operator checkpoint, SIGTERM, a lost daemon) is
local; the decision must not be. Each step the ranks' wishes travel through the job's own collectives as a
two-slot flag vector ``[checkpoint, exit]``: folded into the gradient all-reduce by ``fold`` (the flags ride in
the last concatenated buffer of ``mlx.nn.average_gradients``, which costs nothing measurable), or reduced with
an explicit ``all_max`` by ``agree`` for loops that reduce gradients themselves. Every rank reads the same
result at the same step boundary, so every rank acts on it at the same step.

A gang checkpoint is collective: each rank writes its own small state, a barrier, one rank per host (the
writer) writes the replicated model and optimizer under the usual ``ckpt-*`` name, which commits the
checkpoint, and a second barrier. On resume the ranks agree on the newest step all of them can load
(``all_min`` until every rank holds it).

MLX's own distributed backend carries all of this; the ranks are started with ``MLX_RANK`` and
``MLX_HOSTFILE`` (by the daemon, by ``mlx.launch`` or by hand). The daemon also names the backend
(``MLXSUP_BACKEND``: ring, mpi or jaccl, see ``supervisor.backends``); for MPI, each rank first loads the
environment of its MPI rank from the rendezvous the daemon runs (``MLXSUP_MPI_ENV``, ``worker.mpi_env``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from worker import checkpoint as ckpt
from worker.mpi_env import join_mpi_world

join_mpi_world(os.environ)  # before any mx.distributed.init() of the process, a script's own included

RANK_DIR = "ranks"  # <checkpoint dir>/ranks/rank-R/ckpt-*: each rank's own small state


class GangError(RuntimeError):
    """The ranks cannot form the gang they were told about; the message says how they differ."""


def rank_dir(checkpoints: Path, rank: int) -> Path:
    """Where rank ``rank`` keeps its own state."""
    return checkpoints / RANK_DIR / f"rank-{rank}"


class Gang:
    """This process's place in a data-parallel gang, and the collectives that keep the ranks in step."""

    def __init__(self, rank: int, size: int, writer: bool, group: Any = None, backend: str = "") -> None:
        self.rank = rank
        self.size = size
        self.writer = writer
        self.backend = backend  # "" (mlx.launch or by hand): MLX tries its backends in turn
        self._group = group
        self._agreed: mx.array | None = None  # the flags reduced with this step's gradients

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Gang | None:
        """The gang described by the environment, or None for a single process.

        ``MLX_RANK`` (set by the daemon, ``mlx.launch`` or by hand) makes this a gang; the daemon also sets
        ``MLXSUP_RANKS`` (the size, checked against the group) and ``MLXSUP_WRITER`` (whether this rank writes
        the replicated model: one rank per host). Without them rank 0 writes. With ``MLXSUP_BACKEND=mpi`` this
        also loads the rank's MPI environment from the daemon's rendezvous (``worker.mpi_env``; done when this
        module is imported, for ``os.environ``).
        """
        raw = env.get("MLX_RANK", "")
        if not raw:
            return None
        try:
            rank = int(raw)
            size = int(env.get("MLXSUP_RANKS", "0") or 0)
            writer = bool(int(env.get("MLXSUP_WRITER", "1" if rank == 0 else "0")))
        except ValueError:
            raise GangError(f"MLX_RANK={raw!r}, MLXSUP_RANKS or MLXSUP_WRITER is not an integer") from None
        join_mpi_world(env)  # done at import already for os.environ
        return cls(rank, size, writer, backend=env.get("MLXSUP_BACKEND", ""))

    @property
    def group(self) -> Any:
        """MLX's global group, initialised on first use (a second ``init`` returns the same group)."""
        if self._group is None:
            group = self._init()
            if self.size and group.size() != self.size:
                raise GangError(f"the group has {group.size()} ranks, the daemon started {self.size}")
            if group.rank() != self.rank:
                raise GangError(f"MLX_RANK={self.rank} but the group says rank {group.rank()}")
            self.size = group.size()
            self._group = group
        return self._group

    def _init(self) -> Any:
        if not self.backend:
            return mx.distributed.init()
        try:
            return mx.distributed.init(strict=True, backend=self.backend)
        except (RuntimeError, ValueError) as exc:
            hint = (" (MLX dlopens libmpi.so, which Debian ships in libopenmpi-dev; or set MLX_MPI_LIBNAME, e.g. "
                    "libmpi.so.40)" if self.backend == "mpi" and "Cannot initialize MPI" in str(exc) else "")
            raise GangError(f"rank {self.rank}: the {self.backend} backend did not start: {exc}{hint}") from None

    def fold(self, grads: Any, checkpoint: bool, leave: bool) -> Any:
        """Average ``grads`` over the gang with this rank's wishes riding in the same all-reduce."""
        leaves = tree_flatten(grads)
        dtype = leaves[0][1].dtype if leaves else mx.float32
        flags = mx.array([float(checkpoint), float(leave)], dtype=dtype)
        averaged, agreed = nn.average_gradients([grads, flags], group=self.group)
        mx.eval(averaged, agreed)  # the all-reduce runs here, inside the caller's collective() mark
        self._agreed = agreed
        return averaged

    def agree(self, checkpoint: bool, leave: bool) -> tuple[bool, bool]:
        """(checkpoint, exit) as the whole gang wants it at this step boundary.

        Uses the flags folded into this step's gradients when ``fold`` ran since the last call; otherwise one
        explicit ``all_max`` of the two flags (wishes raised after the fold wait for the next step).
        """
        agreed, self._agreed = self._agreed, None
        if agreed is None:
            agreed = mx.distributed.all_max(mx.array([float(checkpoint), float(leave)]), group=self.group)
        # One evaluation and copy: indexing then .item() evaluates a slice per flag (about 40 us more per step).
        checkpoint_flag, exit_flag = cast(list[float], agreed.tolist())
        return checkpoint_flag > 0, exit_flag > 0

    def barrier(self) -> None:
        """Return once every rank got here (a scalar all-reduce); raises when a peer is gone."""
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=self.group))

    def agree_step(self, step: int) -> tuple[int, int]:
        """(lowest, highest) of every rank's ``step``."""
        value = mx.array([step], dtype=mx.int32)
        low = mx.distributed.all_min(value, group=self.group)
        high = mx.distributed.all_max(value, group=self.group)
        mx.eval(low, high)
        return int(cast(int, low.item())), int(cast(int, high.item()))


def save(gang: Gang, directory: Path, step: int, model: dict[str, mx.array], optimizer: dict[str, mx.array],
         meta: dict[str, Any], keep: int) -> Path:
    """Write gang checkpoint ``step`` (collective: every rank calls it at the same step).

    Each rank's own state first, then a barrier, then the writer's model and optimizer (whose ``ckpt-*`` is the
    commit: the daemon and resume count a step only once it exists), then a second barrier so that no rank
    leaves before the checkpoint is durable. Returns the path this rank wrote last.
    """
    path = ckpt.save_checkpoint(rank_dir(directory, gang.rank), step, {}, {}, meta, keep=keep)
    gang.barrier()
    if gang.writer:
        path = ckpt.save_checkpoint(directory, step, model, optimizer, meta, keep=keep)
    gang.barrier()
    return path


def resume(gang: Gang, directory: Path, log: ckpt.LogFn | None = None) -> tuple[ckpt.Checkpoint | None, dict[str, Any]]:
    """The checkpoint every rank resumes from, and this rank's own extra state at that step.

    Each rank finds its newest loadable checkpoint; the ranks take the lowest of those steps and load it, again
    until every rank holds the same step (a damaged checkpoint on one host moves every rank back). No
    checkpoint on some rank means a fresh start for all.
    """
    limit: int | None = None
    while True:
        main = ckpt.load_latest(directory, log=log, at_most=limit)
        step = main.step if main is not None else 0
        low, high = gang.agree_step(step)
        if low == high:
            break
        limit = low
    if main is None or step == 0:
        return None, {}
    own = ckpt.load_latest(rank_dir(directory, gang.rank), log=log, at_most=step)
    # A run that was a single process before has no rank states: the writer's extra serves every rank.
    source = own.meta if own is not None and own.step == step else main.meta
    return main, dict(source.get("extra", {}))
