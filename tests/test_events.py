"""The event socket: an event is encoded only when someone subscribed to its topic; a slow subscriber never
blocks the daemon. A real DaemonService (sockets bound, loop not running) and real SUB sockets over ipc."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from protocol.control import decode_event
from supervisor.config import load_config
from supervisor.control import server as control_server
from supervisor.daemon.server import DaemonService


@pytest.fixture
def service(config_file: Any) -> Iterator[DaemonService]:
    svc = DaemonService(load_config(config_file({"j": {"autostart": False}})))
    yield svc
    svc.close()


@pytest.fixture
def encoded(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every event the server encodes (the real encoder still runs)."""
    seen: list[dict[str, Any]] = []
    real = control_server.encode_event

    def spy(data: dict[str, Any]) -> bytes:
        seen.append(data)
        return real(data)

    monkeypatch.setattr(control_server, "encode_event", spy)
    return seen


def subscriber(context: zmq.Context[zmq.Socket[bytes]], endpoint: str, topic: bytes, hwm: int = 1000) -> Any:
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.RCVHWM, hwm)
    sub.setsockopt(zmq.SUBSCRIBE, topic)
    sub.connect(endpoint)
    return sub


def serve_subscriptions(svc: DaemonService) -> None:
    """What the daemon's loop does when an event socket is readable: read the subscriptions."""
    for sock, handler in svc.control.sockets().items():
        if sock in svc.control.pubs and sock.poll(0):
            handler(time.monotonic())


def publish_until(svc: DaemonService, sub: Any, kind: str = "telemetry", seconds: float = 10.0) -> dict[str, Any]:
    """Publish numbered events until ``sub`` receives one (subscriptions travel asynchronously)."""
    deadline = time.monotonic() + seconds
    seq = 0
    while time.monotonic() < deadline:
        seq += 1
        serve_subscriptions(svc)
        svc.control.publish("j", kind, {"seq": seq, "new": "RUNNING"})
        if sub.poll(10):
            event: dict[str, Any] = decode_event(sub.recv_multipart()[1])
            return event
    raise AssertionError("the subscriber received nothing")


class TestSubscriptions:
    """Encoding follows the subscriptions XPUB reports."""

    def test_nothing_is_encoded_without_a_subscriber(self, service: DaemonService,
                                                     encoded: list[dict[str, Any]]) -> None:
        for seq in range(100):
            service.control.publish("j", "telemetry", {"seq": seq})
        assert encoded == []

    def test_a_subscriber_receives_and_is_the_only_reason_to_encode(self, service: DaemonService,
                                                                     encoded: list[dict[str, Any]]) -> None:
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        sub = subscriber(context, service.control.events_endpoint, b"job.j.state")
        try:
            assert not service.wants("j", "state")
            got = publish_until(service, sub, "state")
            assert got["new"] == "RUNNING"
            assert service.wants("j", "state") and not service.wants("j", "telemetry")
            assert not service.wants("k", "state")
            encoded.clear()
            for seq in range(50):
                service.control.publish("j", "telemetry", {"seq": seq})  # another topic: nobody wants it
            assert encoded == []
        finally:
            sub.close(linger=0)
            context.term()
        pub = service.control.pubs[0]
        deadline = time.monotonic() + 10  # the unsubscription of a gone subscriber arrives asynchronously too
        while service.control.topics[pub] and time.monotonic() < deadline:
            pub.poll(10)
            serve_subscriptions(service)
        assert service.control.topics[pub] == set()
        encoded.clear()
        service.control.publish("j", "state", {"new": "STOPPED"})
        assert encoded == []

    def test_a_subscriber_that_never_reads_does_not_block_publishing(self, service: DaemonService) -> None:
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        sub = subscriber(context, service.control.events_endpoint, b"", hwm=10)
        try:
            publish_until(service, sub)
            started = time.monotonic()
            for seq in range(50_000):  # far past both high-water marks: the excess is dropped
                service.control.publish("j", "telemetry", {"seq": seq, "pad": "x" * 100})
            print(f"50000 events to a stalled subscriber in {time.monotonic() - started:.2f}s")
            queued = 0
            while sub.poll(200):
                sub.recv_multipart()
                queued += 1
            assert 0 < queued < 50_000  # what the buffers held reached it; the daemon never waited for the rest
            assert publish_until(service, sub)["new"] == "RUNNING"  # once it reads again, it receives again
        finally:
            sub.close(linger=0)
            context.term()

