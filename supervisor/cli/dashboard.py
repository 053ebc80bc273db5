"""``mlxsupctl dashboard`` and ``mlxsupctl metrics``: clients of the control and event sockets, like ``top``.

The dashboard's main thread owns the daemon connection: it polls ``status`` every ``--interval`` seconds and
reads the event stream in between, feeding the model and pushing each change to the open pages. The HTTP
server runs in its own threads; a control click or a whole-run view opens a connection of its own (ZeroMQ
sockets stay with one thread), with the same key, so the daemon audits the click as that key's name.

Depends on the control client and the web package; the parser (``supervisor.cli.mlxsupctl``) calls in here,
never the other way round.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import secrets
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from protocol import ProtocolError
from protocol.control import ControlError, decode_event
from supervisor.control.client import ControlClient, UsageError
from supervisor.web.history import whole_run
from supervisor.web.metrics import render, write_textfile
from supervisor.web.model import Model
from supervisor.web.server import Broadcaster, DashboardServer, Settings

MAX_DRAIN = 1000  # events read per turn before the next status poll is considered
HISTORY_CACHE = 10.0  # seconds a whole-run view is reused (each costs up to 25 requests to the daemon)
TOKEN_ENV = "MLXSUP_DASHBOARD_TOKEN"


def add_arguments(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``dashboard`` and ``metrics`` subcommands (called by mlxsupctl's parser)."""
    dash = sub.add_parser(
        "dashboard", help="a live page in the browser (memory vs budget, restarts, decisions) and /metrics",
        description="Serve a live dashboard of the daemon and its Prometheus /metrics. A client like top: the "
        "daemon opens no new listener, and a read key is enough for a remote daemon.")
    dash.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    dash.add_argument("--port", type=int, default=7790, help="port (default 7790; 0 picks a free one)")
    dash.add_argument("--open", action="store_true", help="open the page in a browser")
    dash.add_argument("--public", action="store_true",
                      help=f"allow a non-loopback --host; every request then needs the token (printed in the "
                      f"page's address; set it with ${TOKEN_ENV})")
    dash.add_argument("--allow-control", action="store_true",
                      help="show checkpoint/stop/restart buttons (when the key's role is operate or admin)")
    dash.add_argument("--interval", type=float, default=0.5, help="seconds between status polls (default 0.5)")
    dash.add_argument("--seconds", type=float, default=None, help="stop after this long")
    metrics = sub.add_parser("metrics", help="the daemon's Prometheus metrics, once (stdout or --textfile)")
    metrics.add_argument("--textfile", type=Path, default=None,
                         help="write them atomically to this file (node_exporter's textfile collector)")
    metrics.add_argument("--wait", type=float, default=1.0,
                         help="seconds to wait for each running job's step telemetry (MLX memory; default 1)")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _caller(client: ControlClient) -> Callable[[str, dict[str, Any]], Any]:
    """One request on a fresh connection with the client's endpoint, key and timeout (for other threads)."""

    def call(command: str, args: dict[str, Any]) -> Any:
        other = ControlClient(client.endpoint, timeout=client.timeout, curve=client.curve)
        try:
            return other.call(command, args)
        finally:
            other.close()

    return call


def _history(call: Callable[[str, dict[str, Any]], Any]) -> Callable[[str], dict[str, Any]]:
    lock = threading.Lock()
    cache: dict[str, tuple[float, dict[str, Any]]] = {}

    def history(job: str) -> dict[str, Any]:
        with lock:  # one whole-run read at a time, whatever the number of pages
            hit = cache.get(job)
            if hit is not None and time.monotonic() - hit[0] < HISTORY_CACHE:
                return hit[1]
            result = whole_run(call, job)
            cache.clear()
            cache[job] = (time.monotonic(), result)
            return result

    return history


def settings_for(args: argparse.Namespace, client: ControlClient) -> Settings:
    """Server settings from the command line; UsageError for a non-loopback host without --public."""
    token = ""
    if not _is_loopback(args.host):
        if not args.public:
            raise UsageError(f"--host {args.host[:64]} is not loopback: add --public (then every request needs "
                             "the token printed with the address)")
        token = os.environ.get(TOKEN_ENV) or secrets.token_urlsafe(24)
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port}: not a TCP port")
    if not 0.05 <= args.interval <= 60:
        raise UsageError(f"--interval {args.interval}: give 0.05 to 60 seconds")
    call = _caller(client)
    return Settings(args.host, args.port, token, args.allow_control, call if args.allow_control else None,
                    _history(call))


def dashboard(args: argparse.Namespace, client: ControlClient, events: str) -> int:
    """Serve the page until Ctrl-C or ``--seconds``."""
    settings = settings_for(args, client)
    model, broadcaster = Model(args.interval), Broadcaster()
    try:
        server = DashboardServer(settings, model, broadcaster)
    except OSError as exc:
        raise UsageError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    url = f"http://{host}:{settings.port}/" + (f"?token={settings.token}" if settings.token else "")
    print(f"dashboard: {url}\nmetrics:   {url.split('?')[0]}metrics", flush=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5}, daemon=True)
    thread.start()
    if args.open:
        import webbrowser

        webbrowser.open(url)
    try:
        feed(client, events, model, broadcaster, args.interval, args.seconds)
    finally:
        server.stopping.set()
        broadcaster.close()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    return 0


def feed(client: ControlClient, events: str, model: Model, broadcaster: Broadcaster, interval: float,
         seconds: float | None) -> None:
    """Poll status and read events until ``seconds`` have passed (forever without it)."""
    import zmq

    end = time.monotonic() + seconds if seconds else float("inf")
    # Without an event endpoint (-s tcp://... and no --events) the page still works, only without decisions.
    sub = client.subscriber(events, ["job."]) if events else client.new_socket(zmq.SUB)
    next_poll = 0.0
    try:
        while time.monotonic() < end:
            if time.monotonic() >= next_poll:
                next_poll = time.monotonic() + interval
                try:
                    broadcaster.publish("tick", model.on_status(client.call("status"), time.time()))
                except ControlError as exc:
                    broadcaster.publish("problem", model.on_error(f"{exc.code}: {exc.message}"))
            wait = max(0.0, min(next_poll, end) - time.monotonic())
            if sub.poll(int(wait * 1000) + 1):
                _drain(sub, model, broadcaster)
    finally:
        sub.close(linger=0)


def _drain(sub: Any, model: Model, broadcaster: Broadcaster) -> None:
    import zmq

    for _ in range(MAX_DRAIN):
        try:
            frames = sub.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        if len(frames) != 2:
            continue
        try:
            event = decode_event(frames[1])
        except ProtocolError:
            continue
        update = model.on_event(frames[0].decode(errors="replace"), event, time.time())
        if update is not None:
            broadcaster.publish("event", update)


def metrics(args: argparse.Namespace, client: ControlClient, events: str) -> int:
    """Print the metrics, or write them atomically with --textfile."""
    model = Model()
    sub = client.subscriber(events, ["job."]) if events and args.wait > 0 else None
    try:
        status = client.call("status")
        running = {row["name"] for row in status.get("jobs", []) if row.get("state") == "RUNNING"}
        deadline = time.monotonic() + max(0.0, args.wait)
        while sub is not None and running - {job for job, _ in model.mlx} and time.monotonic() < deadline:
            if sub.poll(int(max(0.0, deadline - time.monotonic()) * 1000) + 1):
                _drain(sub, model, Broadcaster())
    finally:
        if sub is not None:
            sub.close(linger=0)
    text = render(status, model.mlx)
    if args.textfile is None:
        sys.stdout.write(text)
        return 0
    try:
        write_textfile(args.textfile, text)
    except OSError as exc:
        raise UsageError(f"--textfile {args.textfile}: {exc.strerror or exc}") from None
    return 0
