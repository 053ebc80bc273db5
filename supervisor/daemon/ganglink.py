"""A gang follower's link to its leader: ``gang-sync`` requests over the CURVE-authenticated control channel.

Driven by the daemon's loop (``DaemonService.on_turn``, at least 20 times a second), never blocking it: one
DEALER socket, one request in flight, the reply fed to the job's lifecycle as ``LeaderSays``. A request without
a reply for a few intervals (leader gone, network partition) drops the socket and starts over with a fresh
one, so nothing stale is queued when the hosts see each other again.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
import zmq

from protocol import ProtocolError
from protocol.control import ControlError, Request, decode_reply, encode_request
from supervisor.control.client import curve_keys
from supervisor.core import events as ev
from supervisor.daemon.job import Job

log = structlog.get_logger("mlxsupd")


class GangLink:
    """One follower job's requests to the leader daemon."""

    def __init__(self, job: Job, context: zmq.Context[zmq.Socket[bytes]], resolve: Callable[[str], Path]) -> None:
        gang = job.config.gang
        self.job = job
        self.gang = gang
        self.context = context
        self.endpoint = gang.leader
        self.curve = curve_keys(resolve(gang.client_key), resolve(gang.leader_key))
        self.timeout = max(2.0, 5 * gang.sync_interval)
        self.socket: zmq.Socket[bytes] | None = None
        self.sent_at: float | None = None  # the request in flight
        self.next_at = 0.0
        self.request_id = ""
        self._ids = itertools.count(1)
        self.failing = ""

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close(linger=0)
            self.socket = None

    def _connect(self) -> zmq.Socket[bytes]:
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # no queueing towards a leader that is not connected
        sock.setsockopt(zmq.SNDHWM, 4)
        sock.setsockopt(zmq.MAXMSGSIZE, 1 << 20)
        sock.setsockopt(zmq.RECONNECT_IVL, 200)
        sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)  # notice a dead connection (a partition) within seconds
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.curve[0])
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.curve[1])
        sock.setsockopt(zmq.CURVE_SERVERKEY, self.curve[2])
        sock.connect(self.endpoint)
        return sock

    def turn(self, now: float) -> None:
        """Read a reply if one came; send the next request when due; start over after a silence."""
        if self.socket is None:
            self.socket = self._connect()
        self._read(now)
        if self.sent_at is not None and now - self.sent_at > self.timeout:
            self._failed(f"no reply from {self.endpoint} within {self.timeout:.1f}s")
            self.close()
            self.sent_at = None
            return
        if self.sent_at is None and now >= self.next_at:
            self._send(now)

    def farewell(self, now: float, timeout: float = 2.0) -> bool:
        """The daemon shuts down: send the leader this host's last report (how its ranks ended, nothing alive,
        not wanting to run) marked ``leaving``, and wait up to ``timeout`` seconds for the answer, so the leader
        learns it at once instead of timing the host out. True when the leader answered."""
        if self.socket is None:
            self.socket = self._connect()
        deadline = time.monotonic() + timeout
        self.sent_at = None
        while self.sent_at is None and time.monotonic() < deadline:  # IMMEDIATE: sendable once connected
            self._send(now, leaving=True)
            if self.sent_at is None:
                time.sleep(0.05)
        while self.sent_at is not None and time.monotonic() < deadline:
            if self.socket.poll(50):
                self._read(now)
        told = self.sent_at is None and not self.failing
        log.info("gang_farewell", job=self.job.name, leader=self.endpoint, answered=told)
        return told

    def _send(self, now: float, leaving: bool = False) -> None:
        assert self.socket is not None
        job = self.job
        layout = job.layout
        assert layout is not None
        view = job.lifecycle.follower_view()
        args = {"job": job.name, "host": layout.me_name, "layout": layout.fingerprint(), "epoch": view["epoch"],
                "gen": view["gen"], "alive": view["alive"], "want": view["want"], "ranks": job.rank_rows()}
        if view["outcome"] is not None:
            args["outcome"] = view["outcome"]
        if leaving:
            args["leaving"] = True
        self.request_id = f"gang-{os.getpid()}-{next(self._ids)}"
        try:
            self.socket.send(encode_request(Request(self.request_id, "gang-sync", args)), zmq.NOBLOCK)
        except zmq.Again:
            self._failed(f"leader {self.endpoint} not connected")
            self.next_at = now + self.gang.sync_interval
            return
        self.sent_at = now

    def _read(self, now: float) -> None:
        assert self.socket is not None
        while self.socket.poll(0):
            try:
                reply = decode_reply(self.socket.recv(zmq.NOBLOCK))
            except (ProtocolError, zmq.Again):
                continue
            if reply.get("id") != self.request_id:
                continue  # the answer to a request we gave up on
            self.sent_at = None
            self.next_at = now + self.gang.sync_interval
            if not reply.get("ok"):
                error = reply.get("error") or {}
                self._failed(f"{error.get('code')}: {error.get('message')}")
                continue
            self._answer(now, reply.get("result") or {})

    def _answer(self, now: float, result: dict[str, Any]) -> None:
        try:
            said = ev.LeaderSays(now, str(result["epoch"]), int(result["gen"]), bool(result["run"]),
                                 int(result["batch"]), int(result["accum"]), str(result.get("end", "")),
                                 str(result.get("reason", "")))
        except (KeyError, TypeError, ValueError) as exc:
            self._failed(f"malformed reply: {exc}")
            return
        if said.end not in ("", "STOPPED", "FINISHED", "FATAL") or said.batch < 1 or said.accum < 1:
            self._failed(f"malformed reply: {result}")
            return
        if self.failing:
            log.info("gang_leader_reachable", job=self.job.name, leader=self.endpoint)
            self.failing = ""
        self.job.leader_heard = now
        self.job.feed(said)

    def _failed(self, problem: str) -> None:
        if problem != self.failing:
            log.warning("gang_leader_unreachable", job=self.job.name, leader=self.endpoint, problem=problem)
            self.failing = problem


def make_link(job: Job, context: zmq.Context[zmq.Socket[bytes]], resolve: Callable[[str], Path]) -> GangLink | None:
    """A link for a follower job; None (logged) when its keys cannot be read."""
    try:
        return GangLink(job, context, resolve)
    except (ControlError, OSError) as exc:
        log.error("gang_link_failed", job=job.name, error=str(getattr(exc, "message", exc)))
        return None

