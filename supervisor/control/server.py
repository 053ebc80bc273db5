"""The daemon's control plane: a ROUTER for requests, a PUB for events, CURVE authentication over TCP.

All sockets are polled by the daemon's one loop. ZAP (the ZeroMQ authentication protocol) is answered in
the same loop, against an allow-list of client public keys that a reread refreshes (so a key can be revoked).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import structlog
import zmq
import zmq.auth

from protocol.control import (
    MAX_CONTROL_BYTES,
    RequestError,
    decode_request,
    encode_event,
    encode_reply,
    event_topic,
)
from supervisor.config import ConfigError, ControlConfig
from supervisor.control.commands import REGISTRY, ControlError
from supervisor.core.events import Refused
from supervisor.daemon.rundir import ipc_socket

if TYPE_CHECKING:
    from supervisor.daemon.server import DaemonService

log = structlog.get_logger("mlxsupd")
MAX_DRAIN = 200
ZAP_ENDPOINT = "inproc://zeromq.zap.01"


def is_loopback(endpoint: str) -> bool:
    host = urlsplit(endpoint).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_authorized_keys(path: Path) -> set[bytes]:
    """Z85 public keys, one per line, or `public-key = "..."` lines of keygen .key files; lines starting
    with '#' are comments ('#' is also a Z85 digit, so only a leading one counts)."""
    keys: set[bytes] = set()
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"daemon.control.authorized_keys: cannot read {path}: {exc}") from None
    certificate_format = "public-key" in text
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line.startswith("#"):
            continue
        if certificate_format:
            if not line.startswith("public-key"):
                continue  # the other lines of a certificate (curve, metadata) carry no key
            line = line.split("=", 1)[1].strip().strip('"')
        if not line:
            continue
        if len(line) != 40:
            raise ConfigError(f"daemon.control.authorized_keys: {path}:{number} is not a 40-char Z85 public key")
        keys.add(line.encode())
    return keys


class ControlServer:
    """Request/reply and event sockets of one daemon."""

    def __init__(self, service: DaemonService, context: zmq.Context[Any], run_dir: Path,
                 config: ControlConfig, resolve: Callable[[str], Path]) -> None:
        self.service = service
        self.context = context
        self.routers: list[zmq.Socket[bytes]] = []
        self.zap: zmq.Socket[bytes] | None = None
        self.authorized: set[bytes] = set()
        control, events = ipc_socket(run_dir, "control.sock"), ipc_socket(run_dir, "events.sock")
        self.endpoint = f"ipc://{control}"
        self.events_endpoint = f"ipc://{events}"
        self.pub = context.socket(zmq.PUB)
        self.pub.setsockopt(zmq.SNDHWM, 10_000)
        self.pub.setsockopt(zmq.LINGER, 0)
        try:
            self.routers.append(self._router(self.endpoint, control))
            self._bind(self.pub, self.events_endpoint, events)
            self._setup_tcp(config, resolve)
        except zmq.ZMQError as exc:
            self.close()
            raise ConfigError(f"daemon.control: cannot bind: {exc}") from None
        except BaseException:
            self.close()
            raise

    # -- sockets --------------------------------------------------------------------------------------

    def _router(
        self, endpoint: str, path: Path | None = None, curve: tuple[bytes, bytes] | None = None
    ) -> zmq.Socket[bytes]:
        sock: zmq.Socket[bytes] = self.context.socket(zmq.ROUTER)
        # Oversized frames make libzmq drop the peer; we want an error reply instead, so accept a little more
        # than the protocol maximum and answer "too large" ourselves.
        sock.setsockopt(zmq.MAXMSGSIZE, 4 * MAX_CONTROL_BYTES)
        sock.setsockopt(zmq.RCVHWM, 1_000)
        sock.setsockopt(zmq.SNDHWM, 1_000)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        if curve is not None:
            sock.setsockopt(zmq.CURVE_SERVER, 1)
            sock.setsockopt(zmq.CURVE_PUBLICKEY, curve[0])
            sock.setsockopt(zmq.CURVE_SECRETKEY, curve[1])
            sock.setsockopt(zmq.ZAP_DOMAIN, b"mlxsup")
        self._bind(sock, endpoint, path)
        return sock

    @staticmethod
    def _bind(sock: zmq.Socket[bytes], endpoint: str, path: Path | None) -> None:
        if path is not None:
            path.unlink(missing_ok=True)
        sock.bind(endpoint)
        if path is not None:
            os.chmod(path, 0o600)

    def _setup_tcp(self, config: ControlConfig, resolve: Callable[[str], Path]) -> None:
        endpoints = [e for e in (config.tcp, config.events_tcp) if e]
        if not endpoints:
            return
        for endpoint in endpoints:
            if not endpoint.startswith("tcp://"):
                raise ConfigError(f"daemon.control: {endpoint!r} is not a tcp:// endpoint")
        if not config.server_key:
            if not (config.allow_plaintext_loopback and all(is_loopback(e) for e in endpoints)):
                raise ConfigError("daemon.control.tcp requires CURVE (server_key and authorized_keys); plain TCP is "
                                  "only allowed on a loopback address with allow_plaintext_loopback = true")
            log.warning("control_plaintext_tcp", endpoints=endpoints)
            curve = None
        else:
            if not config.authorized_keys:
                raise ConfigError("daemon.control.server_key is set but authorized_keys is empty")
            try:
                public, secret = zmq.auth.load_certificate(resolve(config.server_key))
            except (OSError, ValueError) as exc:
                raise ConfigError(f"daemon.control.server_key: {exc}") from None
            if secret is None:
                raise ConfigError(f"daemon.control.server_key {config.server_key}: not a secret key file")
            curve = (public, secret)
            self.authorized = read_authorized_keys(resolve(config.authorized_keys))
            self.zap = self.context.socket(zmq.REP)
            self.zap.setsockopt(zmq.LINGER, 0)
            self.zap.bind(ZAP_ENDPOINT)
        if config.tcp:
            self.routers.append(self._router(config.tcp, curve=curve))
        if config.events_tcp:
            if curve is not None:
                self.pub.setsockopt(zmq.CURVE_SERVER, 1)
                self.pub.setsockopt(zmq.CURVE_PUBLICKEY, curve[0])
                self.pub.setsockopt(zmq.CURVE_SECRETKEY, curve[1])
                self.pub.setsockopt(zmq.ZAP_DOMAIN, b"mlxsup")
            self.pub.bind(config.events_tcp)

    def sockets(self) -> dict[zmq.Socket[bytes], Callable[[float], None]]:
        handlers: dict[zmq.Socket[bytes], Callable[[float], None]] = {r: self._drainer(r) for r in self.routers}
        if self.zap is not None:
            handlers[self.zap] = self._on_zap
        return handlers

    def close(self) -> None:
        for sock in [*self.routers, self.pub, *([self.zap] if self.zap else [])]:
            sock.close(linger=0)

    # -- events ---------------------------------------------------------------------------------------

    def publish(self, job: str, kind: str, data: dict[str, Any]) -> None:
        try:
            self.pub.send_multipart([event_topic(job, kind), encode_event(data)], zmq.NOBLOCK)
        except zmq.Again:
            pass  # a slow subscriber loses events; the daemon never waits for it

    # -- authentication -------------------------------------------------------------------------------

    def _on_zap(self, now: float) -> None:
        assert self.zap is not None
        while self.zap.poll(0):
            frames = self.zap.recv_multipart(zmq.NOBLOCK)
            request_id = frames[1] if len(frames) > 1 else b""
            # Our ipc sockets (no ZAP domain) also ask once a handler exists: their guard is the 0700 run dir.
            local = len(frames) >= 6 and frames[2] != b"mlxsup" and frames[5] == b"NULL"
            curve_ok = (len(frames) >= 7 and frames[0] == b"1.0" and frames[2] == b"mlxsup" and frames[5] == b"CURVE"
                        and zmq.utils.z85.encode(frames[6]) in self.authorized)
            ok = local or curve_ok
            address = frames[3].decode(errors="replace") if len(frames) > 3 else "?"
            if ok:
                # The user id travels with every message of the session, so a later revocation is enforced
                # per message (ZAP alone only runs at the handshake).
                user = zmq.utils.z85.encode(frames[6]) if curve_ok else b"local"
                reply = [b"1.0", request_id, b"200", b"OK", user, b""]
            else:
                log.warning("control_auth_refused", address=address,
                            mechanism=frames[5].decode(errors="replace") if len(frames) > 5 else "?")
                reply = [b"1.0", request_id, b"400", b"not an authorized key", b"", b""]
            self.zap.send_multipart(reply)

    def reload_keys(self, config: ControlConfig, resolve: Callable[[str], Path]) -> None:
        """Reread the allow-list (a reread is how a key is revoked)."""
        if self.zap is not None and config.authorized_keys:
            self.authorized = read_authorized_keys(resolve(config.authorized_keys))
            log.info("control_keys_reloaded", keys=len(self.authorized))

    # -- requests -------------------------------------------------------------------------------------

    def _drainer(self, router: zmq.Socket[bytes]) -> Callable[[float], None]:
        curve = bool(router.getsockopt(zmq.CURVE_SERVER))

        def drain(now: float) -> None:
            for _ in range(MAX_DRAIN):
                try:
                    parts = router.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    return
                if curve and str(parts[-1].get("User-Id")).encode() not in self.authorized:
                    log.warning("control_auth_refused", reason="key revoked during the session")
                    continue
                self._serve(router, [part.bytes for part in parts])

        return drain

    def _serve(self, router: zmq.Socket[bytes], frames: list[bytes]) -> None:
        # DEALER peers send [identity, payload]; REQ peers [identity, b"", payload]. Echo the envelope.
        envelope, body = frames[:1], frames[1:]
        if len(body) >= 2 and body[0] == b"":
            envelope, body = frames[:2], frames[2:]
        request_id, result, error = "", None, None
        try:
            if len(body) != 1:
                raise RequestError(f"expected one payload frame, got {len(body)}")
            request = decode_request(body[0])
            request_id = request.id
            result = self.dispatch(request.cmd, request.args)
        except RequestError as exc:
            request_id = exc.request_id
            error = (ControlError.BAD_REQUEST, str(exc))
        except ControlError as exc:
            error = (exc.code, exc.message)
        except Exception as exc:  # a handler bug must not take the daemon down; say so and keep serving
            log.exception("control_handler_failed")
            error = (ControlError.INTERNAL, f"{exc.__class__.__name__}: {exc}")
        if error is not None:
            log.info("control_error", code=error[0], message=error[1][:200])
        try:
            router.send_multipart([*envelope, encode_reply(request_id, result, error)], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the client went away or is not reading: never block the loop for it

    def dispatch(self, name: str, args: dict[str, Any]) -> Any:
        command = REGISTRY.get(name)
        if command is None:
            raise ControlError(ControlError.UNKNOWN_COMMAND,
                               f"unknown command {name[:32]!r}; try 'help' ({', '.join(sorted(REGISTRY))})")
        try:
            return command.handle(self.service, command.check(args))
        except Refused as exc:  # the job's lifecycle cannot take the request in its current state
            raise ControlError(ControlError.BAD_STATE, str(exc)) from None
