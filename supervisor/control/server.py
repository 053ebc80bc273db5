"""The daemon's control plane: a ROUTER for requests, an XPUB for events, CURVE authentication over TCP.

All sockets are polled by the daemon's one loop. ZAP (the ZeroMQ authentication protocol) is answered in
the same loop, against an allow-list of client public keys and their roles that a reread refreshes. A revoked
key is refused on every later request of an open session (the key travels with each message) and cut off the
TCP event stream (its endpoint is rebound, authorized subscribers reconnect by themselves). Each request is
checked against the role its command needs; state-changing requests and refusals go to the audit trail.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import os
import time
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
from supervisor.control.access import LOCAL, LOOPBACK, Principal, authorize, read_authorized_keys
from supervisor.control.audit import AuditTrail
from supervisor.control.commands import REGISTRY, ControlCommand, ControlError
from supervisor.core.events import Refused
from supervisor.daemon.rundir import ipc_socket

if TYPE_CHECKING:
    from supervisor.daemon.server import DaemonService

log = structlog.get_logger("mlxsupd")
MAX_DRAIN = 200
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
MAX_AUDIT_ARGS = 1024  # characters of a request's arguments kept in the audit trail
REBIND_TRIES = 100  # x 10 ms: the old listener is closed by libzmq's I/O thread, shortly after unbind


def is_loopback(endpoint: str) -> bool:
    host = urlsplit(endpoint).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ControlServer:
    """Request/reply and event sockets of one daemon."""

    def __init__(self, service: DaemonService, context: zmq.Context[Any], run_dir: Path,
                 config: ControlConfig, resolve: Callable[[str], Path], audit: AuditTrail) -> None:
        self.service = service
        self.context = context
        self.audit = audit
        self.routers: dict[zmq.Socket[bytes], Principal | None] = {}  # socket -> its fixed principal, None: CURVE
        self.zap: zmq.Socket[bytes] | None = None
        self.keys: dict[bytes, Principal] = {}  # Z85 public key -> who it is
        control, events = ipc_socket(run_dir, "control.sock"), ipc_socket(run_dir, "events.sock")
        self.endpoint = f"ipc://{control}"
        self.events_endpoint = f"ipc://{events}"
        self.pubs: list[zmq.Socket[bytes]] = []
        self.topics: dict[zmq.Socket[bytes], set[bytes]] = {}  # each event socket's subscribed topic prefixes
        self.events_tcp = ""  # the bound TCP event endpoint (port resolved), rebound when a key is revoked
        try:
            self.routers[self._router(self.endpoint, control)] = LOCAL
            self._bind(self._pub(), self.events_endpoint, events)
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
        self._secure(sock, curve)
        self._bind(sock, endpoint, path)
        return sock

    def _pub(self, curve: tuple[bytes, bytes] | None = None) -> zmq.Socket[bytes]:
        # XPUB, not PUB: it hands us its subscriptions, so an event nobody subscribed to is never encoded.
        # Past SNDHWM a subscriber's events are dropped (XPUB_NODROP stays off): a slow one never blocks us.
        sock: zmq.Socket[bytes] = self.context.socket(zmq.XPUB)
        sock.setsockopt(zmq.SNDHWM, 10_000)
        sock.setsockopt(zmq.LINGER, 0)
        self._secure(sock, curve)
        self.pubs.append(sock)
        self.topics[sock] = set()
        return sock

    @staticmethod
    def _secure(sock: zmq.Socket[bytes], curve: tuple[bytes, bytes] | None) -> None:
        if curve is not None:
            sock.setsockopt(zmq.CURVE_SERVER, 1)
            sock.setsockopt(zmq.CURVE_PUBLICKEY, curve[0])
            sock.setsockopt(zmq.CURVE_SECRETKEY, curve[1])
            sock.setsockopt(zmq.ZAP_DOMAIN, b"mlxsup")

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
        curve = self._curve(config, resolve)
        if curve is None:
            if not (config.allow_plaintext_loopback and all(is_loopback(e) for e in endpoints)):
                raise ConfigError("daemon.control.tcp requires CURVE (server_key and authorized_keys); plain TCP is "
                                  "only allowed on a loopback address with allow_plaintext_loopback = true")
            log.warning("control_plaintext_tcp", endpoints=endpoints)
        if config.tcp:
            self.routers[self._router(config.tcp, curve=curve)] = None if curve is not None else LOOPBACK
        if config.events_tcp:
            pub = self._pub(curve)
            pub.bind(config.events_tcp)
            self.events_tcp = pub.getsockopt_string(zmq.LAST_ENDPOINT)

    def _curve(self, config: ControlConfig, resolve: Callable[[str], Path]) -> tuple[bytes, bytes] | None:
        """The server keypair, with the allow-list loaded and the ZAP handler bound; None without server_key."""
        if not config.server_key:
            return None
        if not config.authorized_keys:
            raise ConfigError("daemon.control.server_key is set but authorized_keys is empty")
        try:
            public, secret = zmq.auth.load_certificate(resolve(config.server_key))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"daemon.control.server_key: {exc}") from None
        if secret is None:
            raise ConfigError(f"daemon.control.server_key {config.server_key}: not a secret key file")
        self.keys = read_authorized_keys(resolve(config.authorized_keys))
        self.zap = self.context.socket(zmq.REP)
        self.zap.setsockopt(zmq.LINGER, 0)
        self.zap.bind(ZAP_ENDPOINT)
        return public, secret

    def sockets(self) -> dict[zmq.Socket[bytes], Callable[[float], None]]:
        # Subscriptions first: the loop serves readable sockets in this order, so a client that subscribes and
        # then sends a request gets the events that request causes.
        handlers: dict[zmq.Socket[bytes], Callable[[float], None]] = {
            pub: functools.partial(self._on_subscriptions, pub) for pub in self.pubs}
        handlers.update({router: self._drainer(router, principal) for router, principal in self.routers.items()})
        if self.zap is not None:
            handlers[self.zap] = self._on_zap
        return handlers

    def close(self) -> None:
        for sock in [*self.routers, *self.pubs, *([self.zap] if self.zap else [])]:
            sock.close(linger=0)

    # -- events ---------------------------------------------------------------------------------------

    def wants(self, job: str, kind: str) -> bool:
        """Whether some subscriber's topics take this event (per the subscriptions read so far)."""
        topic = event_topic(job, kind)
        return any(topic.startswith(prefix) for prefixes in self.topics.values() for prefix in prefixes)

    def publish(self, job: str, kind: str, data: dict[str, Any]) -> None:
        """Send an event to the subscribers of its topic; encoded only when there is one (per the
        subscriptions read so far: the loop reads them as they arrive)."""
        topic = b""
        frames: list[bytes] = []
        for pub, prefixes in self.topics.items():
            if not prefixes:
                continue
            topic = topic or event_topic(job, kind)
            if not any(topic.startswith(prefix) for prefix in prefixes):
                continue
            frames = frames or [topic, encode_event(data)]
            try:
                pub.send_multipart(frames, zmq.NOBLOCK)
            except zmq.Again:
                pass  # a slow subscriber loses events; the daemon never waits for it

    def _on_subscriptions(self, pub: zmq.Socket[bytes], now: float) -> None:
        """Read what changed: XPUB passes a topic's first subscription and, when its last subscriber
        unsubscribes or disconnects, its unsubscription."""
        topics = self.topics[pub]
        for _ in range(MAX_DRAIN):
            try:
                message = pub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if message[:1] == b"\x01":
                topics.add(message[1:])
            elif message[:1] == b"\x00":
                topics.discard(message[1:])

    def _rebind_events(self) -> None:
        """Drop every TCP event subscriber: unbinding closes the sessions its listener accepted. Authorized
        subscribers reconnect by themselves (and pass ZAP again); revoked ones are refused at the handshake."""
        if not self.events_tcp:
            return
        pub = self.pubs[-1]
        started = time.monotonic()
        try:
            pub.unbind(self.events_tcp)
        except zmq.ZMQError as exc:
            log.warning("events_unbind_failed", endpoint=self.events_tcp, error=str(exc))
        for _ in range(REBIND_TRIES):
            try:
                pub.bind(self.events_tcp)
                break
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EADDRINUSE:
                    log.error("events_rebind_failed", endpoint=self.events_tcp, error=str(exc))
                    return
                time.sleep(0.01)
        else:
            log.error("events_rebind_failed", endpoint=self.events_tcp, error="address still in use after 1 s")
            return
        log.info("events_rebound", endpoint=self.events_tcp, seconds=round(time.monotonic() - started, 3))

    # -- authentication -------------------------------------------------------------------------------

    def _on_zap(self, now: float) -> None:
        assert self.zap is not None
        while self.zap.poll(0):
            frames = self.zap.recv_multipart(zmq.NOBLOCK)
            request_id = frames[1] if len(frames) > 1 else b""
            # Our ipc sockets (no ZAP domain) also ask once a handler exists: their guard is the 0700 run dir.
            local = len(frames) >= 6 and frames[2] != b"mlxsup" and frames[5] == b"NULL"
            curve = len(frames) >= 7 and frames[5] == b"CURVE" and len(frames[6]) == 32
            key = zmq.utils.z85.encode(frames[6]) if curve else b""
            curve_ok = curve and frames[0] == b"1.0" and frames[2] == b"mlxsup" and key in self.keys
            if local or curve_ok:
                # The user id travels with every message of the session, so a later revocation (or role
                # change) is enforced per message (ZAP alone only runs at the handshake).
                reply = [b"1.0", request_id, b"200", b"OK", key if curve_ok else b"local", b""]
            else:
                address = frames[3].decode(errors="replace") if len(frames) > 3 else "?"
                mechanism = frames[5].decode(errors="replace") if len(frames) > 5 else "?"
                self.audit.refuse("unauthenticated", f"unknown@{address}", now, command="connect",
                                  mechanism=mechanism, key=key.decode() or None)
                reply = [b"1.0", request_id, b"400", b"not an authorized key", b"", b""]
            self.zap.send_multipart(reply)

    def reload_keys(self, config: ControlConfig, resolve: Callable[[str], Path]) -> None:
        """Reread the allow-list (a reread is how a key is revoked or its role changed)."""
        if self.zap is None or not config.authorized_keys:
            return
        keys = read_authorized_keys(resolve(config.authorized_keys))
        removed = sorted(self.keys[k].name for k in set(self.keys) - set(keys))
        self.keys = keys
        log.info("control_keys_reloaded", keys=len(keys), removed=removed)
        if removed:
            self._rebind_events()

    # -- requests -------------------------------------------------------------------------------------

    def _drainer(self, router: zmq.Socket[bytes], fixed: Principal | None) -> Callable[[float], None]:
        def drain(now: float) -> None:
            for _ in range(MAX_DRAIN):
                try:
                    parts = router.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    return
                principal = fixed
                if principal is None:
                    user = str(parts[-1].get("User-Id")).encode()
                    principal = self.keys.get(user)
                    if principal is None:
                        self.audit.refuse("revoked", f"key:{user[:8].decode(errors='replace')}", now,
                                          key=user.decode(errors="replace"), address=_peer(parts[-1]))
                        continue
                self._serve(router, [part.bytes for part in parts], principal, now)

        return drain

    def _serve(self, router: zmq.Socket[bytes], frames: list[bytes], principal: Principal, now: float) -> None:
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
            result = self.dispatch(request.cmd, request.args, principal, request_id, now)
        except RequestError as exc:
            request_id = exc.request_id
            error = (ControlError.BAD_REQUEST, str(exc))
        except ControlError as exc:
            error = (exc.code, exc.message)
        except Exception as exc:  # a bug outside the handlers must not take the daemon down either
            log.exception("control_request_failed")
            error = (ControlError.INTERNAL, f"{exc.__class__.__name__}: {str(exc)[:200]}")
        if error is not None:
            log.info("control_error", code=error[0], message=error[1][:200], client=principal.name)
        try:
            router.send_multipart([*envelope, encode_reply(request_id, result, error)], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the client went away or is not reading: never block the loop for it

    def dispatch(self, name: str, args: dict[str, Any], principal: Principal = LOCAL, request_id: str = "",
                 now: float = 0.0) -> Any:
        """Check the role, run the command; a state-changing request is audited with its outcome."""
        command = REGISTRY.get(name)
        if command is None:
            raise ControlError(ControlError.UNKNOWN_COMMAND,
                               f"unknown command {name[:32]!r}; try 'help' ({', '.join(sorted(REGISTRY))})")
        audited = {"id": request_id, "role": principal.role.label, "args": _bounded(args)}
        try:
            authorize(principal, name, command.required_role(args))
        except ControlError:
            self.audit.refuse("forbidden", principal.name, now, command=name, **audited)
            raise
        changes = command.changes_state(args)
        try:
            result = self._handle(command, args, principal)
        except ControlError as exc:
            if changes:
                self.audit.record(principal.name, name, **audited, error=exc.code, message=exc.message[:200])
            raise
        if changes:
            self.audit.record(principal.name, name, **audited, result=result)
        return result

    def _handle(self, command: ControlCommand, args: dict[str, Any], principal: Principal) -> Any:
        """Run a command; every failure becomes a ControlError."""
        try:
            return command.handle(self.service, command.check(args), client=principal.name)
        except Refused as exc:  # the job's lifecycle cannot take the request in its current state
            raise ControlError(ControlError.BAD_STATE, str(exc)) from None
        except ControlError:
            raise
        except Exception as exc:  # a handler bug must not take the daemon down; say so and keep serving
            log.exception("control_handler_failed")
            raise ControlError(ControlError.INTERNAL, f"{exc.__class__.__name__}: {exc}") from None


def _bounded(args: dict[str, Any]) -> Any:
    """A request's arguments for the audit: as sent, or their first characters when they are large."""
    try:
        text = json.dumps(args, default=str)
    except (RecursionError, ValueError, TypeError):  # msgpack decodes deeper nesting than json encodes
        return {"unprintable": "arguments nested too deep to record"}
    return args if len(text) <= MAX_AUDIT_ARGS else {"truncated": text[:MAX_AUDIT_ARGS]}


def _peer(frame: zmq.Frame) -> str | None:
    try:
        return str(frame.get("Peer-Address"))
    except zmq.ZMQError:
        return None
