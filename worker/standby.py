"""A standby: the next worker, started while the current one still trains, waiting for its turn.

Starting a worker costs an interpreter and the imports of MLX (and, for mlx-lm, of mlx-lm and transformers);
none of that depends on the checkpoint. So while a life runs steadily the daemon may start its successor early
with ``MLXSUP_STANDBY=1`` and a token of its own. The successor runs up to the point where it needs the
checkpoint and calls ``wait_for_go(session)`` (``Session.resume`` does it for any SDK loop): that sends a
``standby`` frame and blocks, sending heartbeats, until the daemon's ``go`` arrives with the batch, the
accumulation and the checkpoint to restore. Only then does it read the checkpoint, say ``hello`` with its token
(the daemon has made it the job's worker by then) and step. Spec: docs/PROTOCOL.md section 11.

What a standby must not do before ``go``: read model weights or the checkpoint (it would hold memory the
daemon counts against the job, and the checkpoint is not written yet), seed or draw from any random generator the
restore sets, or say ``hello``. What it may do: import, parse arguments, read its training data. Told to leave, it
holds nothing worth saving: SIGTERM, a daemon gone (re-parented) or silent for ``MLXSUP_ORPHAN_TIMEOUT`` end the
process at once with status 75, without a checkpoint or a goodbye; the daemon dismisses a standby it no longer
wants with SIGKILL to its process group.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from protocol import Go

if TYPE_CHECKING:
    from worker.session import Session

FEATURE = "standby"  # in a hello's features: this worker's successors may be started as standbys
ENV = "MLXSUP_STANDBY"  # "1": this process is a standby (set by the daemon only for such a job)
POLL_MS = 50  # the longest the waiting loop keeps the socket's lock from the session's pulse thread


@dataclasses.dataclass(frozen=True)
class Orders:
    """What ``go`` says: run at ``batch`` x ``accum``; the newest checkpoint on disk when it was sent is
    ``checkpoint`` at ``step`` (None and 0: there was none). Restore the newest *good* checkpoint as always
    (docs/PROTOCOL.md section 6): a damaged one falls back to the one before, whatever ``checkpoint`` says."""

    batch: int
    accum: int
    checkpoint: Path | None
    step: int

    @classmethod
    def of(cls, go: Go) -> Orders:
        return cls(go.batch, go.accum, Path(go.checkpoint) if go.checkpoint else None, go.step)


def wait_for_go(session: Session) -> Orders | None:
    """Block as a standby until the daemon's ``go``, and return its orders (the session's batch and accumulation
    are set to them). None when this process is not a standby: go on as any worker. Call it at the point where
    the worker needs the checkpoint, before it loads model weights; calling it again returns the same orders at
    once. May not return: a standby told to leave exits 75 (see the module's docstring)."""
    return session.standby()
