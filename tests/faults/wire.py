"""Talking to a daemon on its own sockets: control requests over ipc (or CURVE TCP), raw worker frames."""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Any

import msgpack
import zmq

from protocol.control import Request, encode_request


class Control:
    """A DEALER on the control socket; one outstanding request at a time unless ``send_raw`` is used."""

    def __init__(self, endpoint: str, curve: tuple[bytes, bytes, bytes] | None = None) -> None:
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.sock = self.context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 100_000)
        self.sock.setsockopt(zmq.RCVHWM, 100_000)
        self.sock.setsockopt(zmq.SNDTIMEO, 5000)
        if curve is not None:
            public, secret, server = curve
            self.sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
            self.sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
            self.sock.setsockopt(zmq.CURVE_SERVERKEY, server)
        self.endpoint = endpoint
        self.last_id = ""  # of the last request sent, to find it in the audit trail
        self.sock.connect(endpoint)

    @classmethod
    def ipc(cls, run_dir: Path) -> Control:
        return cls(f"ipc://{run_dir / 'control.sock'}")

    def request(self, cmd: str, args: dict[str, Any] | None = None, timeout: float = 5.0) -> dict[str, Any] | None:
        """Send one request and wait for its reply (None when none came in time)."""
        request_id = self.last_id = secrets.token_hex(4)
        self.sock.send(encode_request(Request(request_id, cmd, args or {})))
        return self.receive(timeout, request_id)

    def receive(self, timeout: float, request_id: str | None = None) -> dict[str, Any] | None:
        """The next reply (with ``request_id`` when given: stale replies are skipped), or None on timeout."""
        deadline = time.monotonic() + timeout
        for _ in range(1000):
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(int(left * 1000) + 1):
                return None
            parts = self.sock.recv_multipart()  # a REQ-style envelope comes back as [b"", reply]
            try:
                reply = msgpack.unpackb(parts[-1], raw=False)
            except ValueError:
                reply = None
            if not isinstance(reply, dict):
                return {"ok": False, "error": {"code": "garbled reply", "message": repr(parts)[:100]}}
            if request_id is None or reply.get("id") == request_id:
                return reply
        return None

    def result(self, cmd: str, args: dict[str, Any] | None = None, timeout: float = 5.0) -> Any:
        """The result of a request that must succeed; RuntimeError otherwise."""
        reply = self.request(cmd, args, timeout)
        if reply is None or not reply.get("ok"):
            raise RuntimeError(f"{cmd} {args}: {reply}")
        return reply["result"]

    def job(self, name: str) -> dict[str, Any]:
        jobs: list[dict[str, Any]] = self.result("status", {"job": name})["jobs"]
        return jobs[0]

    def close(self) -> None:
        self.sock.close(linger=0)
        self.context.term()


def answers(run_dir: Path, timeout: float = 3.0) -> bool:
    """Whether a daemon on ``run_dir`` answers ``version``."""
    client = Control.ipc(run_dir)
    try:
        reply = client.request("version", timeout=timeout)
        return reply is not None and bool(reply.get("ok"))
    finally:
        client.close()


class WorkerPeer:
    """A DEALER on the daemon's worker socket, as a (fake) worker would connect."""

    def __init__(self, run_dir: Path) -> None:
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.sock = self.context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 10_000)
        self.sock.setsockopt(zmq.SNDTIMEO, 5000)
        self.sock.connect(f"ipc://{run_dir / 'workers.sock'}")

    def send(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def drain(self) -> int:
        """Replies the daemon sent us (it should send none to an unknown peer)."""
        count = 0
        while count < 100_000 and self.sock.poll(0):
            self.sock.recv_multipart()
            count += 1
        return count

    def close(self, linger_ms: int = 0) -> None:
        """Close; with ``linger_ms`` first hand libzmq that long to deliver what is still queued."""
        self.sock.close(linger=linger_ms)
        self.context.term()
