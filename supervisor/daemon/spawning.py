"""Starting a job's workers: every rank of a new life, and the environment each one gets (docs/PROTOCOL.md 5).

The lifecycle decides when (its ``Spawn`` and ``SpawnStandby`` actions); these functions carry that out for a
``Job`` through ``supervisor.daemon.system``: a fresh spawn token per rank, the ``MLXSUP_*`` variables, a gang's
hostfile and backend environment, the rank's own log directory and process group.
"""

from __future__ import annotations

import os
import secrets
import signal
from pathlib import Path
from typing import TYPE_CHECKING

from supervisor.config import worker_argv
from supervisor.core import events as ev
from supervisor.core.sizes import parse_bytes, parse_fraction_of
from supervisor.daemon import backends
from supervisor.daemon.ranks import rank_env, write_ring
from supervisor.daemon.system import WorkerProcess
from supervisor.daemon.tails import log_size

if TYPE_CHECKING:
    from supervisor.daemon.job import Job


def spawn_life(job: Job, action: ev.Spawn) -> None:
    """Start every local rank of life ``action.life``; a rank that cannot start ends the whole life."""
    now = job.system.now()
    if job.next_config is not None and job.lifecycle.next is None:
        job.config, job.next_config = job.next_config, None  # the lifecycle has adopted it
        job.layout = job.next_layout
    job.tokens = {rank: secrets.token_hex(16) for rank in job.lifecycle.settings.ranks}
    job.identities = {}
    job.protocols = {}
    newest = job.newest_step()
    try:
        if job.layout is not None and job.paths.ring is not None:
            write_ring(job.layout, job.paths.ring, action.life)
        extra = backends.prepare(job, action.life)
        spawned = []
        for rank in job.lifecycle.settings.ranks:
            env = backends.rank_environment(worker_env(job, job.tokens[rank], action.batch, action.accum, rank),
                                            extra.get(rank, {}))
            job.stderr_start[rank] = log_size(job.stderr_path(rank))
            proc = start(job, env, rank)
            job.procs[(action.life, rank)] = proc
            spawned.append((rank, proc))
    except OSError as exc:
        for (life, _), proc in job.procs.items():
            if life == action.life:
                proc.signal_group(signal.SIGKILL)  # a gang without all its ranks cannot run: reaped as strays
        job.feed(ev.SpawnFailed(action.life, now, str(exc)))
        return
    for rank, proc in spawned:
        job.feed(ev.Spawned(action.life, now, proc.pid, newest, rank))


def start(job: Job, env: dict[str, str], rank: int) -> WorkerProcess:
    """One worker process of ``job`` for ``rank``, in its own process group, logging to the rank's directory."""
    cwd = Path(job.config.working_dir) if job.config.working_dir else None
    return job.system.spawn(worker_argv(job.config), env, cwd, job.log_dir(rank))


def worker_env(job: Job, token: str, batch: int, accum: int, rank: int = 0,
               standby: bool = False) -> dict[str, str]:
    """The environment of one worker: the daemon's, the job's ``env``, then the ``MLXSUP_*`` variables."""
    config = job.config
    env = {**os.environ, **config.env, "PYTHONUNBUFFERED": "1"}
    env.update({
        "MLXSUP_ENDPOINT": job.endpoint, "MLXSUP_TOKEN": token, "MLXSUP_JOB": job.name,
        "MLXSUP_CHECKPOINT_DIR": str(job.paths.checkpoints), "MLXSUP_BATCH": str(batch),
        "MLXSUP_ACCUM": str(accum), "MLXSUP_CHECKPOINT_EVERY": str(config.checkpoint_every),
        "MLXSUP_KEEP_CHECKPOINTS": str(config.keep_checkpoints),
        "MLXSUP_ORPHAN_TIMEOUT": str(job.orphan_timeout),
        "MLXSUP_CACHE_LIMIT": str(parse_fraction_of(config.cache_limit, job.limits.budget)),
        "MLXSUP_CACHE_CLEAR_BYTES": str(parse_bytes(config.cache_clear)),
        "MLXSUP_STANDBY": "1" if standby else "0",  # a standby waits for its go (supervisor.daemon.standby)
    })
    if job.layout is not None and job.paths.ring is not None:
        env.update(rank_env(job.layout, job.paths.ring, rank))
    return env
