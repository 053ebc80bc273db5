"""What a gang's records say about how its ranks ended: each rank's exit, and the shape of a gang hang.

MLX's collectives have no timeout: a rank whose peer is stopped, lost or deadlocked blocks inside ``all_sum``
(ml-explore/mlx#3862, #4278, #4475), and a ring survivor of a lost peer fails with "connection to a peer was
lost". The lifecycle turns such a gang into a hang or a crash; these pure functions name what happened, so the
history tells the cause from its fall-out. Plain data in, fields and strings out.
"""

from __future__ import annotations

import signal
from typing import Any

from protocol.messages import EXIT_CHECKPOINTED
from supervisor.core.life import Life, Rank


def rank_exit_fields(life: Life, rank: Rank, first: bool, restart_reason: str,
                     tail: tuple[str, ...] = ()) -> dict[str, Any]:
    """One ``rank_exit`` record: pid, code, signal, last step, goodbye. A failure is ``expected`` (with its
    ``cause``) when the supervisor had signalled the rank, or when a peer failed first (``first`` is False and the
    life crashed): not a new failure but the fall-out of one; the first rank's own failure is ``expected: false``.
    An unclean exit also carries the rank's last stderr lines (``stderr_tail``): a survivor's traceback is read
    here, under ``expected: true``, and never as the life's failure."""
    code = rank.exit_code if rank.exit_code is not None else 0
    fields: dict[str, Any] = {"rank": rank.rank, "life": life.id, "pid": rank.pid, "code": code,
                              "step": rank.last_step, "goodbye": rank.goodbye}
    if code < 0:
        fields["signal"] = signal_name(-code)
    if rank.goodbye_step is not None:
        fields["goodbye_step"] = rank.goodbye_step
    if code not in (0, EXIT_CHECKPOINTED):
        fields["expected"] = bool(rank.signalled or (not first and life.crashed))
        if fields["expected"]:
            fields["cause"] = rank.signalled or f"peer lost: {restart_reason}"
        if tail:
            fields["stderr_tail"] = list(tail)
    return fields


def gang_hang(life: Life, now: float, timeout: float) -> str:
    """A gang hang, named by its shape: the ranks silent without saying they wait inside a collective (stopped,
    hung in their own code, never entering the collective, or lost) first, then the ranks that said they wait
    inside one (``Waiting``); every rank waiting inside a collective is a deadlock like ml-explore/mlx#4475, or a
    peer lost where the backend does not notice (JACCL)."""
    alive = sorted(life.alive, key=lambda r: r.rank)
    silent = [r for r in alive if not r.waiting]
    waiting = [r for r in alive if r.waiting]
    parts = [f"rank {r.rank} silent {now - r.last_heard:.1f}s" for r in silent]
    parts += [f"rank {r.rank} waiting in {r.waiting} for {now - r.waiting_since:.1f}s" for r in waiting]
    shape = "" if silent else " (every rank blocked inside a collective: a deadlock, or a peer lost unnoticed)"
    return f"hung: {'; '.join(parts)}{shape} (timeout {timeout}s)"


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)
