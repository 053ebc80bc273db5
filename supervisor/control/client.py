"""Client side of the control plane: requests with ids and timeouts, and event subscriptions."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import zmq
import zmq.auth

from protocol import ProtocolError
from protocol.control import ControlError, Request, decode_event, decode_reply, encode_request

TIMEOUT = "timeout"


class UsageError(Exception):
    """A command line that cannot work (mlxsupctl exits 2); the message says what to add or change."""


def curve_keys(key_file: Path, server_key_file: Path | None) -> tuple[bytes, bytes, bytes]:
    """(client public, client secret, server public) from keygen files; ControlError names a bad file."""
    try:
        public, secret = zmq.auth.load_certificate(key_file)
    except (OSError, ValueError) as exc:
        raise ControlError(ControlError.BAD_VALUE, f"--key {key_file}: {exc}") from None
    if secret is None:
        raise ControlError(ControlError.BAD_VALUE, f"--key {key_file}: not a secret key file (*.key_secret)")
    server_file = server_key_file or key_file.with_name("server.key")
    try:
        server_public, _ = zmq.auth.load_certificate(server_file)
    except (OSError, ValueError) as exc:
        raise ControlError(ControlError.BAD_VALUE, f"server key {server_file}: {exc} (use --server-key)") from None
    return public, secret, server_public


class ControlClient:
    """One DEALER connection to a daemon's control socket."""

    def __init__(self, endpoint: str, timeout: float = 5.0, curve: tuple[bytes, bytes, bytes] | None = None) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.curve = curve
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.socket = self.new_socket(zmq.DEALER)
        self.socket.connect(endpoint)
        self._ids = itertools.count(1)
        self._prefix = f"{os.getpid()}-"

    def new_socket(self, kind: int) -> zmq.Socket[bytes]:
        """A socket of this client's context with its timeouts and CURVE keys (for subscriptions)."""
        sock = self.context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, 8 * 1024 * 1024)
        if self.curve is not None:
            sock.setsockopt(zmq.CURVE_PUBLICKEY, self.curve[0])
            sock.setsockopt(zmq.CURVE_SECRETKEY, self.curve[1])
            sock.setsockopt(zmq.CURVE_SERVERKEY, self.curve[2])
        return sock

    def call(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        """Send one request and wait for its reply; ControlError on an error reply or a timeout."""
        request_id = f"{self._prefix}{next(self._ids)}"
        deadline_ms = int(self.timeout * 1000)
        # A DEALER's send waits for a connected peer; a refused handshake never gives one, so bound it too.
        self.socket.setsockopt(zmq.SNDTIMEO, deadline_ms)
        try:
            self.socket.send(encode_request(Request(request_id, cmd, args or {})))
        except zmq.Again:
            raise ControlError(TIMEOUT, f"could not send to {self.endpoint} within {self.timeout}s "
                                        "(daemon not running, or not authorized)") from None
        while self.socket.poll(deadline_ms):
            try:
                reply = decode_reply(self.socket.recv())
            except ProtocolError:
                continue
            if reply.get("id") != request_id:
                continue  # a late reply to an earlier, timed-out request
            if reply["ok"]:
                return reply.get("result")
            error = reply.get("error") or {}
            raise ControlError(str(error.get("code", "error")), str(error.get("message", "")))
        raise ControlError(TIMEOUT, f"no reply from {self.endpoint} within {self.timeout}s "
                                    "(daemon not running, or not authorized)")

    def subscriber(self, endpoint: str, topics: list[str]) -> zmq.Socket[bytes]:
        """A SUB socket connected to the event stream; UsageError names a missing or malformed endpoint."""
        if not endpoint:
            raise UsageError("no event endpoint: with -s tcp://... give --events tcp://HOST:PORT (the daemon's "
                             "[daemon.control] events_tcp)")
        sub = self.new_socket(zmq.SUB)
        sub.setsockopt(zmq.RCVHWM, 10_000)
        for topic in topics:
            sub.setsockopt(zmq.SUBSCRIBE, topic.encode())
        try:
            sub.connect(endpoint)
        except zmq.ZMQError as exc:
            sub.close(linger=0)
            raise UsageError(f"--events {endpoint[:80]!r}: {exc}") from None
        return sub

    def subscribe(
        self, endpoint: str, topics: list[str], timeout: float | None = None
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """Yield (topic, event) from the daemon's event stream; stops after ``timeout`` s of silence if set."""
        sub = self.subscriber(endpoint, topics)
        try:
            while True:
                if not sub.poll(int(timeout * 1000) if timeout is not None else 1000):
                    if timeout is not None:
                        return
                    continue
                frames = sub.recv_multipart()
                if len(frames) != 2:
                    continue
                try:
                    yield frames[0].decode(errors="replace"), decode_event(frames[1])
                except ProtocolError:
                    continue
        finally:
            sub.close(linger=0)

    def close(self) -> None:
        self.socket.close(linger=0)
        self.context.destroy(linger=0)
