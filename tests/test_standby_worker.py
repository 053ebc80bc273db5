"""The worker side of a standby (docs/PROTOCOL.md section 11), against a scripted daemon: a real ROUTER socket on
ipc and the real built-in worker (``python -m worker``) spawned in its own process group."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import zmq

from protocol import Go, Heartbeat, Hello, Message, Standby, Step, Welcome, decode, encode

MiB = 1024 * 1024
# What a waiting standby of the built-in job may hold (Linux RSS of its process group): Python, MLX, ZeroMQ and
# the training text (4 MiB at most), never the model. Measured at about 35 MiB here (40-43 MiB in a daemon run).
STANDBY_BOUND = 64 * MiB
TIMEOUT = 60.0


class Daemon:
    """One ROUTER socket and the worker processes it spawned (killed by process group at the end)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.sock = self.context.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.endpoint = f"ipc://{tmp}/w.sock"
        self.sock.bind(self.endpoint)
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, token: str, *, standby: bool, steps: int = 6, orphan_timeout: float = 30.0,
              batch: int = 4) -> subprocess.Popen[bytes]:
        env = {**os.environ, "MLXSUP_ENDPOINT": self.endpoint, "MLXSUP_TOKEN": token, "MLXSUP_JOB": "demo",
               "MLXSUP_CHECKPOINT_DIR": str(self.tmp / "ckpt"), "MLXSUP_BATCH": str(batch), "MLXSUP_ACCUM": "1",
               "MLXSUP_ORPHAN_TIMEOUT": str(orphan_timeout), "MLXSUP_STANDBY": "1" if standby else "0",
               "PYTHONUNBUFFERED": "1"}
        argv = [sys.executable, "-m", "worker", "--steps", str(steps), "--dim", "32", "--layers", "1",
                "--context", "16", "--batch", str(batch)]
        with open(self.tmp / f"{token[:6]}.err", "wb") as err:
            proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                    start_new_session=True)
        self.procs.append(proc)
        return proc

    def receive(self, timeout: float = TIMEOUT) -> tuple[bytes, Message]:
        if not self.sock.poll(int(timeout * 1000)):
            raise AssertionError(f"nothing from the worker within {timeout}s")
        identity, frame = self.sock.recv_multipart()
        return identity, decode(frame)

    def until(self, kind: type[Message], timeout: float = TIMEOUT) -> tuple[bytes, Message, list[Message]]:
        """Frames until one of ``kind``; returns its sender, it, and every frame before it."""
        before: list[Message] = []
        deadline = time.monotonic() + timeout
        while True:
            identity, message = self.receive(max(0.01, deadline - time.monotonic()))
            if isinstance(message, kind):
                return identity, message, before
            before.append(message)

    def send(self, identity: bytes, message: Message, version: int = 2) -> None:
        self.sock.send_multipart([identity, encode(message, version)])

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        self.sock.close(0)
        self.context.term()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path)
    try:
        yield d
    finally:
        d.close()


def group_rss(pid: int) -> int:
    """RSS of a process and its children (the standby's process group as the daemon samples it on Linux)."""
    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])


def wait_standby(daemon: Daemon, token: str) -> tuple[bytes, Standby]:
    identity, message, before = daemon.until(Standby)
    assert isinstance(message, Standby) and message.token == token
    assert all(isinstance(m, Heartbeat) for m in before), before
    daemon.send(identity, Welcome(2))
    return identity, message


class TestWaiting:
    """A standby says ``standby``, loads nothing and says nothing else until its go."""

    def test_waits_without_hello_and_without_weights_then_runs_the_go_orders(self, daemon: Daemon) -> None:
        token = secrets.token_hex(16)
        proc = daemon.spawn(token, standby=True, batch=4)
        identity, message = wait_standby(daemon, token)
        assert message.pid == proc.pid and message.protocol >= 2
        deadline = time.monotonic() + 2.5  # it waits: heartbeats with its token, nothing else
        beats = 0
        while time.monotonic() < deadline:
            daemon.send(identity, Heartbeat(time.time()))
            if daemon.sock.poll(250):
                beat = daemon.receive()[1]
                assert isinstance(beat, Heartbeat) and beat.token == token, beat
                beats += 1
        assert beats >= 1 and proc.poll() is None
        held = group_rss(proc.pid)
        assert held < STANDBY_BOUND, f"a waiting standby holds {held / MiB:.1f} MiB"
        assert not (daemon.tmp / "ckpt").exists() or not any((daemon.tmp / "ckpt").iterdir())
        daemon.send(identity, Go(2, 2, "", 0))
        hello_from, hello, before = daemon.until(Hello)
        assert isinstance(hello, Hello)
        assert all(isinstance(m, Heartbeat) for m in before), before
        assert hello_from == identity and hello.token == token  # the same socket, the same token
        assert (hello.batch, hello.accum, hello.start_step) == (2, 2, 0)  # go's batch overrides MLXSUP_BATCH
        assert "standby" in (hello.features or "").split()
        _, step, _ = daemon.until(Step)
        assert isinstance(step, Step) and (step.step, step.batch, step.accum) == (1, 2, 2)

    def test_a_worker_not_spawned_as_standby_says_hello_at_once(self, daemon: Daemon) -> None:
        token = secrets.token_hex(16)
        daemon.spawn(token, standby=False)
        _, hello, before = daemon.until(Hello)
        assert isinstance(hello, Hello) and hello.token == token
        assert not any(isinstance(m, Standby) for m in before)
        assert "standby" in (hello.features or "").split()


class TestLeaving:
    """A standby told to leave exits 75 at once, with nothing written."""

    def test_sigterm_while_waiting_exits_75_without_a_checkpoint(self, daemon: Daemon) -> None:
        token = secrets.token_hex(16)
        proc = daemon.spawn(token, standby=True)
        wait_standby(daemon, token)
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=10) == 75
        assert not (daemon.tmp / "ckpt").exists() or not any((daemon.tmp / "ckpt").iterdir())

    def test_a_silent_daemon_ends_the_standby(self, daemon: Daemon) -> None:
        token = secrets.token_hex(16)
        proc = daemon.spawn(token, standby=True, orphan_timeout=1.0)
        wait_standby(daemon, token)  # then nothing more from the daemon
        assert proc.wait(timeout=20) == 75
        err = (daemon.tmp / f"{token[:6]}.err").read_text()
        assert "standby_exit reason=daemon_silent" in err

    def test_a_command_before_go_is_not_acted_on(self, daemon: Daemon) -> None:
        from protocol import Command

        token = secrets.token_hex(16)
        proc = daemon.spawn(token, standby=True)
        identity, _ = wait_standby(daemon, token)
        daemon.send(identity, Command(Command.CHECKPOINT_EXIT, "leak"))
        daemon.send(identity, Heartbeat(time.time()))
        time.sleep(0.5)
        assert proc.poll() is None
        daemon.send(identity, Go(4, 1, "", 0))
        _, hello, _ = daemon.until(Hello)
        assert isinstance(hello, Hello) and hello.start_step == 0
