"""A job's standby on processes and sockets: spawn it, route its frames, heartbeat it, sample it, send its go.

The lifecycle decides (``supervisor.core.standby``); this module carries out its ``SpawnStandby`` and ``Go``
actions for a ``Job`` and turns the standby's frames into events. The standby's process lives in ``Job.procs``
under the life id it will have, so it is sampled, signalled, reaped and killed at the daemon's exit like any
worker; its token is kept apart from the current workers' until its go, so it can never pass for one of them
(docs/PROTOCOL.md section 11).
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import structlog

from protocol import Go, Heartbeat, Hello, Message, ProtocolError, Standby, Welcome, encode, negotiate
from protocol.checkpoints import checkpoint_name
from supervisor.core import events as ev
from supervisor.daemon import spawning
from supervisor.daemon.tails import log_size

if TYPE_CHECKING:
    from supervisor.daemon.job import Job

log = structlog.get_logger("mlxsupd")
Send = Callable[[bytes, bytes], None]  # (identity, frame)
_ROUTED = (Standby, Heartbeat, Hello)  # the types a standby sends (a step never concerns one: one look per frame)


@dataclasses.dataclass
class Link:
    """The daemon's side of a standby: its token, and its socket identity once it said ``standby``."""

    life: int
    token: str
    identity: bytes | None = None
    protocol: int = 1
    go: Go | None = None  # its go, made before it said standby: sent the moment it does


def carry_out(job: Job, action: ev.SpawnStandby | ev.Go) -> None:
    if isinstance(action, ev.SpawnStandby):
        _spawn(job, action)
    else:
        _go(job, action)


def _spawn(job: Job, action: ev.SpawnStandby) -> None:
    now = job.system.now()
    token = secrets.token_hex(16)
    env = spawning.worker_env(job, token, action.batch, action.accum, standby=True)
    try:
        proc = spawning.start(job, env, 0)
    except OSError as exc:
        job.feed(ev.StandbySpawnFailed(action.life, now, str(exc)))
        return
    job.procs[(action.life, 0)] = proc
    job.standby_link = Link(action.life, token)
    job.feed(ev.StandbySpawned(action.life, now, proc.pid))


def _go(job: Job, action: ev.Go) -> None:
    """The standby becomes the job's worker: go with the newest checkpoint; its token is the current one now."""
    link, now = job.standby_link, job.system.now()
    assert link is not None and link.life == action.life
    newest = job.newest_step()
    path = str(job.paths.checkpoints / checkpoint_name(newest)) if newest else ""
    go = Go(action.batch, action.accum, path, newest)
    if link.identity is None:
        link.go = go  # still importing: its standby frame gets the go (the startup timer runs meanwhile)
    else:
        job.send_frame(link.identity, encode(go, link.protocol))
        job.standby_link = None
    job.tokens = {0: link.token}
    job.identities, job.protocols = {}, {}
    job.stderr_start[0] = log_size(job.stderr_path(0))
    job.feed(ev.Spawned(action.life, now, job.procs[(action.life, 0)].pid, newest))


def forget(job: Job, life: int) -> None:
    """The process of life ``life`` was reaped: its link, if it had one, goes with it."""
    if job.standby_link is not None and job.standby_link.life == life:
        job.standby_link = None


def exited(job: Job, life: int, code: int, now: float) -> bool:
    """A reaped process of ``job`` that is neither current nor departing: True when it was its standby (the event
    is fed)."""
    sb = job.lifecycle.standby
    if sb is None or sb.id != life:
        return False
    job.feed(ev.StandbyExited(life, now, code))
    return True


def sample(job: Job, now: float) -> int | None:
    """The standby's group footprint (None without a standby process)."""
    sb = job.lifecycle.standby
    proc = job.procs.get((sb.id, 0)) if sb is not None else None
    return proc.sample(now).bytes if proc is not None else None


def heartbeat(job: Job, sent_at: float, send: Send) -> None:
    """The daemon's heartbeat to a waiting standby (its orphan timer runs on them)."""
    link = job.standby_link
    if link is not None and link.identity is not None:
        send(link.identity, encode(Heartbeat(sent_at), link.protocol))


def route(jobs: Iterable[Job], message: Message, identity: bytes, now: float, send: Send) -> bool:
    """A frame that concerns a standby: its ``standby``, its heartbeats, or a hello it must not send yet. True when
    handled (the caller skips it); anything else goes the way of any worker's frame. Cheap for a step."""
    if not isinstance(message, _ROUTED):
        return False
    token = message.token if not isinstance(message, Heartbeat) else (message.token or "")
    for job in jobs:
        link = job.standby_link
        if link is None:
            continue
        if link.identity == identity or (token and secrets.compare_digest(token, link.token)):
            _standby_frame(job, link, message, identity, now, send)
            return True
    return False


def _standby_frame(job: Job, link: Link, message: Standby | Heartbeat | Hello, identity: bytes, now: float,
                   send: Send) -> None:
    if link.go is not None:
        _promoted_frame(job, link, message, identity, now, send)
    elif isinstance(message, Heartbeat):
        job.feed(ev.StandbyHeard(link.life, now))
    elif isinstance(message, Hello):
        job.log.warning("standby_hello_refused", life=link.life, pid=message.pid, reason="hello before its go")
        job.feed(ev.StandbyFailed(link.life, now, "hello before its go"))
    elif link.identity is None:
        try:
            version = negotiate(message.protocol)
        except ProtocolError as exc:
            job.feed(ev.StandbyFailed(link.life, now, str(exc)))
            return
        link.identity, link.protocol = identity, version
        job.feed(ev.StandbyIn(link.life, now))
        send(identity, encode(Welcome(version), version))
        send(identity, encode(Heartbeat(time.time()), version))


def _promoted_frame(job: Job, link: Link, message: Standby | Heartbeat | Hello, identity: bytes, now: float,
                    send: Send) -> None:
    """A frame of a standby made the job's worker before it said standby: its standby gets the go at once."""
    if isinstance(message, Heartbeat):
        job.heard_before_hello(link.token, now)
    elif isinstance(message, Hello):
        job.log.warning("standby_hello_refused", life=link.life, pid=message.pid, reason="hello before its go")
    else:
        try:
            version = negotiate(message.protocol)
        except ProtocolError as exc:
            job.log.warning("standby_refused", life=link.life, pid=message.pid, reason=str(exc))
            return
        assert link.go is not None
        send(identity, encode(Welcome(version), version))
        send(identity, encode(link.go, version))
        job.standby_link = None
