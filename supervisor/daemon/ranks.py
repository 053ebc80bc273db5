"""A gang's ranks as the daemon shows and starts them: status rows, the environment of a rank, the ring file."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from protocol.durable import write_durably
from supervisor.hostfile import Layout, ring_json

if TYPE_CHECKING:
    from supervisor.daemon.job import Job


def rank_rows(job: Job) -> list[dict[str, Any]]:
    """A job's local ranks as status and top show them: step, memory against the per-rank budget, decision."""
    life, stats = job.life, job.stats
    rows = []
    for rank in job.lifecycle.settings.ranks:
        current = life.ranks.get(rank) if life is not None else None
        rows.append({
            "rank": rank, "host": job.layout.me_name if job.layout else "",
            "pid": current.pid if current is not None and current.alive else None,
            "state": ("running" if current.hello else "starting") if current is not None and current.alive
            else "exited" if current is not None else "-",
            "step": current.last_step if current is not None else stats.steps_completed,
            "sampled_bytes": current.last_bytes if current is not None else 0,
            "max_sampled_bytes": stats.rank_max_sampled.get(rank, 0), "budget_bytes": job.limits.budget,
            "leak_bytes_per_step": round(current.estimator.slope) if current is not None else 0,
            "decision": job.last_decision.get(rank, ""), "protocol": job.protocols.get(rank),
        })
    return rows


def rank_env(layout: Layout, ring: Path, rank: int) -> dict[str, str]:
    """What rank ``rank`` is started with: MLX's ring variables, and the gang's size and writer for the SDK."""
    return {"MLX_RANK": str(rank), "MLX_HOSTFILE": str(ring), "MLXSUP_RANKS": str(layout.world),
            "MLXSUP_WRITER": str(int(layout.writer(rank)))}


def write_ring(layout: Layout, path: Path, generation: int) -> None:
    """The MLX_HOSTFILE of a generation (fresh ports), replaced atomically and durably: ranks read it once, at init."""
    write_durably(path, ring_json(layout, generation))
