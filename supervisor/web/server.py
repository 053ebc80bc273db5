"""The dashboard's HTTP server (standard library only): the page, its assets, a Server-Sent Events stream,
``/metrics``, and control POSTs.

Bounded: at most ``MAX_CLIENTS`` event streams, each with a queue of ``QUEUE_CAP`` messages (a page that
falls behind is dropped and reconnects by itself to a fresh snapshot); every socket has a timeout; an event
stream ends when its page goes (the keep-alive write fails) or the server stops.

Security: every request's Host must name this server (against DNS rebinding), or, beyond loopback, carry
the token; a control POST also needs an Origin equal to this server, a JSON body, ``--allow-control`` and a
key whose role allows the command. Nothing changes through GET.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import queue
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from protocol.control import ControlError
from supervisor.web.metrics import CONTENT_TYPE, render
from supervisor.web.model import Model
from supervisor.web.page import render_page

MAX_CLIENTS = 16
QUEUE_CAP = 256
KEEPALIVE = 15.0  # seconds between comments on a quiet event stream (finds a page that went)
MAX_BODY = 4096
CONTROL_COMMANDS = ("checkpoint", "stop", "restart")
ROLES = {"read": 10, "operate": 20, "admin": 30}
STATIC = {"dashboard.js": "text/javascript; charset=utf-8", "dashboard.css": "text/css; charset=utf-8"}
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")


@dataclasses.dataclass
class Settings:
    """How the server was asked to run."""

    host: str
    port: int
    token: str = ""  # required on every request when non-empty (a non-loopback --host)
    allow_control: bool = False
    control: Callable[[str, dict[str, Any]], Any] | None = None  # one control request, as the key
    history: Callable[[str], dict[str, Any]] | None = None  # the whole run of a job, downsampled

    @property
    def remote(self) -> bool:
        return bool(self.token)

    def hosts(self) -> set[str]:
        names = {*LOOPBACK_NAMES, self.host if ":" not in self.host else f"[{self.host}]"}
        return {f"{name}:{self.port}" for name in names}


class Broadcaster:
    """The open event streams, each a bounded queue; a full queue drops its page (it reconnects)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.clients: set[queue.Queue[bytes | None]] = set()
        self.sent = 0

    def join(self) -> queue.Queue[bytes | None] | None:
        with self.lock:
            if len(self.clients) >= MAX_CLIENTS:
                return None
            client: queue.Queue[bytes | None] = queue.Queue(QUEUE_CAP)
            self.clients.add(client)
            return client

    def leave(self, client: queue.Queue[bytes | None]) -> None:
        with self.lock:
            self.clients.discard(client)

    def publish(self, name: str, data: Any) -> None:
        frame = f"event: {name}\ndata: {json.dumps(data, default=str, separators=(',', ':'))}\n\n".encode()
        with self.lock:
            for client in list(self.clients):
                try:
                    client.put_nowait(frame)
                except queue.Full:
                    self.clients.discard(client)
                    _force(client, None)
            self.sent += 1

    def close(self) -> None:
        with self.lock:
            for client in self.clients:
                _force(client, None)
            self.clients.clear()


def _force(client: queue.Queue[bytes | None], item: bytes | None) -> None:
    """Put ``item`` even into a full queue (dropping its oldest message)."""
    while True:
        try:
            client.put_nowait(item)
            return
        except queue.Full:
            try:
                client.get_nowait()
            except queue.Empty:
                pass


class DashboardServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 16

    def __init__(self, settings: Settings, model: Model, broadcaster: Broadcaster) -> None:
        self.settings, self.model, self.broadcaster = settings, model, broadcaster
        self.stopping = threading.Event()
        super().__init__((settings.host, settings.port), Handler)
        self.settings.port = self.server_address[1]  # port 0: the one the OS chose


class Handler(BaseHTTPRequestHandler):
    server: DashboardServer
    timeout = 30  # every read and write on the connection
    protocol_version = "HTTP/1.1"
    server_version = "mlxsup-dashboard"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a quiet client process; requests are not worth a line each

    # -- checks ------------------------------------------------------------------------------------

    def _allowed(self) -> bool:
        settings = self.server.settings
        query = parse_qs(urlsplit(self.path).query)
        if settings.token:
            given = (query.get("token") or [""])[0] or self.headers.get("X-Mlxsup-Token", "")
            bearer = self.headers.get("Authorization", "")
            if bearer.startswith("Bearer "):
                given = given or bearer[7:]
            if not hmac.compare_digest(given.encode(), settings.token.encode()):
                self._send(HTTPStatus.UNAUTHORIZED, "text/plain", b"token required (?token=... or a Bearer header)\n")
                return False
            return True
        if self.headers.get("Host", "") not in settings.hosts():
            self._send(HTTPStatus.MISDIRECTED_REQUEST, "text/plain", b"unknown Host header\n")
            return False
        return True

    def _send(self, code: int, kind: str, body: bytes, extra: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", "default-src 'self'; frame-ancestors 'none'")
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, code: int, data: Any) -> None:
        self._send(code, "application/json", json.dumps(data, default=str).encode())

    # -- GET ---------------------------------------------------------------------------------------

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        path = url.path
        if path.startswith("/static/") and path[8:] in STATIC and (self.server.settings.token or self._allowed()):
            # Assets hold nothing secret: beyond loopback they load without the token (a stylesheet link
            # cannot carry it).
            body = resources.files("supervisor.web").joinpath("static", path[8:]).read_bytes()
            self._send(HTTPStatus.OK, STATIC[path[8:]], body)
            return
        if not self._allowed():
            return
        if path == "/":
            self._page()
        elif path == "/events":
            self._events()
        elif path == "/api/snapshot":
            self._json(HTTPStatus.OK, self._snapshot())
        elif path == "/api/history":
            self._history((parse_qs(url.query).get("job") or [""])[0])
        elif path == "/metrics":
            status, mlx = self.server.model.metrics_view()
            self._send(HTTPStatus.OK, CONTENT_TYPE, render(status, mlx).encode())
        else:
            self._send(HTTPStatus.NOT_FOUND, "text/plain", b"not found\n")

    def _snapshot(self) -> dict[str, Any]:
        return {**self.server.model.snapshot(), "controls": self._controls()}

    def _controls(self) -> list[str]:
        """The buttons this page may show: only with --allow-control and a key of role operate or higher."""
        settings = self.server.settings
        status = self.server.model.status or {}
        role = ROLES.get(str((status.get("client") or {}).get("role", "read")), 10)
        return list(CONTROL_COMMANDS) if settings.allow_control and role >= ROLES["operate"] else []

    def _page(self) -> None:
        settings = self.server.settings
        remote = f"{settings.host}:{settings.port}" if settings.remote else ""
        token = (parse_qs(urlsplit(self.path).query).get("token") or [""])[0] if settings.remote else ""
        body = render_page(self.server.model.snapshot(), remote=remote, token_query=token,
                           controls=bool(self._controls()))
        self._send(HTTPStatus.OK, "text/html; charset=utf-8", body.encode())

    def _events(self) -> None:
        client = self.server.broadcaster.join()
        if client is None:
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, "text/plain", b"too many open dashboards\n",
                       {"Retry-After": "10"})
            return
        try:
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-store")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            snapshot = json.dumps(self._snapshot(), default=str, separators=(",", ":"))
            self.wfile.write(f"retry: 2000\nevent: snapshot\ndata: {snapshot}\n\n".encode())
            self.wfile.flush()
            while not self.server.stopping.is_set():
                try:
                    frame = client.get(timeout=KEEPALIVE)
                except queue.Empty:
                    frame = b": keep-alive\n\n"
                if frame is None:
                    return
                self.wfile.write(frame)
                self.wfile.flush()
        except OSError:
            return  # the page went
        finally:
            self.server.broadcaster.leave(client)

    def _history(self, job: str) -> None:
        history = self.server.settings.history
        if history is None:
            self._json(HTTPStatus.NOT_FOUND, {"error": "no whole-run view here"})
            return
        try:
            self._json(HTTPStatus.OK, history(job))
        except ControlError as exc:
            self._json(HTTPStatus.BAD_GATEWAY, {"error": f"{exc.code}: {exc.message}"})

    # -- POST --------------------------------------------------------------------------------------

    def do_POST(self) -> None:
        if not self._allowed():
            return
        if urlsplit(self.path).path != "/api/control":
            self._send(HTTPStatus.NOT_FOUND, "text/plain", b"not found\n")
            return
        problem = self._control_problem()
        if problem:
            self._json(HTTPStatus.FORBIDDEN, {"error": problem})
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if not 0 < length <= MAX_BODY or not self.headers.get("Content-Type", "").startswith("application/json"):
            self._json(HTTPStatus.BAD_REQUEST, {"error": f"expected a JSON body of at most {MAX_BODY} bytes"})
            return
        try:
            body = json.loads(self.rfile.read(length))
            command, job = body["command"], body["job"]
            if command not in CONTROL_COMMANDS or not isinstance(job, str):
                raise ValueError(command)
        except (ValueError, KeyError, TypeError):
            self._json(HTTPStatus.BAD_REQUEST, {"error": f"expected {{\"command\": one of {CONTROL_COMMANDS}, "
                                                         "\"job\": NAME}"})
            return
        self._control(command, job)

    def _control_problem(self) -> str:
        settings = self.server.settings
        if not settings.allow_control or settings.control is None:
            return "control is off: start the dashboard with --allow-control"
        host = self.headers.get("Host", "")
        if self.headers.get("Origin", "") != f"http://{host}" or (not settings.token and host not in settings.hosts()):
            return "a control request must come from this dashboard's own page (Origin and Host)"
        if not self._controls():
            return "the daemon key's role does not allow checkpoint, stop or restart (needs operate)"
        return ""

    def _control(self, command: str, job: str) -> None:
        control = self.server.settings.control
        if control is None:  # pragma: no cover - _control_problem refuses first
            return
        try:
            result = control(command, {"job": job})
        except ControlError as exc:
            self._json(HTTPStatus.CONFLICT if exc.code != "timeout" else HTTPStatus.GATEWAY_TIMEOUT,
                       {"error": f"{exc.code}: {exc.message}"})
            return
        self._json(HTTPStatus.OK, {"ok": True, "result": result})
