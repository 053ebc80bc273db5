"""The scripted supervisor: one ROUTER socket in a private directory, one worker life at a time.

Every wait is bounded; while it waits the harness keeps sending heartbeats (unless a check silences them), and a
worker is always killed by process group when its life ends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import msgpack
import psutil
import zmq

from protocol.checkpoints import CheckpointDamaged, checkpoint_name, unlisted_files, verify
from protocol.conformance.adopt import PARENT, Adopted, become_subreaper
from protocol.messages import (
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    CheckpointSaved,
    Goodbye,
    Heartbeat,
    Hello,
    Message,
    ProtocolError,
    Step,
    Steps,
    Welcome,
    decode,
    encode,
)

JOB = "conformance"
M = TypeVar("M", Hello, Step, CheckpointSaved, Goodbye)
EXIT_GRACE = 0.3  # seconds to keep reading frames a worker sent just before it exited
class Abort(Exception):
    """The current life cannot go on; the message says what was missing."""


@dataclasses.dataclass(frozen=True)
class Options:
    """Tunables of a kit run (all bounded waits)."""

    timeout: float = 30.0  # longest wait for any one expected frame (hello, a step, a checkpoint)
    orphan_timeout: float = 1.5  # MLXSUP_ORPHAN_TIMEOUT given to the worker
    kill_grace: float = 3.0  # SIGTERM to exit, as the daemon's default kill_grace
    finish_timeout: float = 120.0  # the last life must reach its target within this
    heartbeat_interval: float = 0.25
    keep_checkpoints: int = 2
    keep_files: bool = False  # leave the private directory (logs, checkpoints) for inspection


@dataclasses.dataclass(frozen=True)
class Received:
    at: float  # time.monotonic() of arrival
    message: Message
    version: int = 0  # the frame's ``v`` (0: not read, see Life.read_versions)


class Process(Protocol):
    """The worker process of a life: a child of the kit, or a grandchild it adopts (``Adopted``)."""

    @property
    def pid(self) -> int: ...

    def poll(self) -> int | None: ...


def frame_version(frame: bytes) -> int:
    """The ``v`` of a frame that decoded (so it is a map with an integer ``v``)."""
    version = msgpack.unpackb(frame, raw=False).get("v", 0)
    return version if isinstance(version, int) else 0


@dataclasses.dataclass(frozen=True)
class Verified:
    """What a checkpoint looked like the moment its checkpoint_saved arrived."""

    ok: bool
    detail: str


class Life:
    """One spawned worker: its frames, its process group, the heartbeats it gets."""

    def __init__(self, harness: Harness, popen: Process, token: str, env: dict[str, str],
                 accepts: str | None = None) -> None:
        self.harness = harness
        self.popen = popen
        self.token = token
        self.env = env
        self.identity: bytes | None = None
        self.version = 1  # the protocol version agreed in the welcome
        self.received: list[Received] = []
        self.bad_frames: list[str] = []
        self.verified: dict[int, Verified] = {}
        self.heartbeats = True
        # The token whose hello gets a welcome: a hello with any other gets no word, as from the daemon.
        self.accepts = token if accepts is None else accepts
        self.read_versions = False  # note each frame's ``v`` in Received.version (a second unpack per frame)
        self.grant: dict[str, Any] = {}  # extra heartbeat fields: the permission to hold (hold, hold_below, ...)
        self.last_beat = 0.0  # time.monotonic() of the newest heartbeat sent
        self._next_beat = 0.0

    @property
    def pid(self) -> int:
        return self.popen.pid

    def last_step(self) -> int | None:
        """Step of the newest step frame (or newest row of a ``steps`` frame) so far."""
        for item in reversed(self.received):
            if isinstance(item.message, Step):
                return item.message.step
            if isinstance(item.message, Steps):
                return item.message.step[-1]
        return None

    def next(self, deadline: float) -> Received | None:
        """The next frame of this worker before ``deadline`` (monotonic); None on time-out or once it exited."""
        exited_at: float | None = None
        while True:
            now = time.monotonic()
            if self.heartbeats and self.identity is not None and now >= self._next_beat:
                self.send(Heartbeat(time.time(), **self.grant))
                self.last_beat = now
                self._next_beat = now + self.harness.options.heartbeat_interval
            if now >= deadline:
                return None
            if exited_at is None and self.popen.poll() is not None:
                exited_at = now
            if exited_at is not None and now - exited_at > EXIT_GRACE and not self.harness.socket.poll(0):
                return None  # gone, and every frame it sent before is read (a backlog is read to its end)
            beat = self._next_beat if self.heartbeats and self.identity is not None else deadline
            wait = min(deadline, beat, now + 0.05) - now
            item = self.harness.receive(self, max(0.0, wait))
            if item is not None:
                return item

    def expect(self, wanted: Callable[[Message], bool], what: str, timeout: float,
               refuse: Callable[[Message], str] | None = None) -> Received:
        """Read frames until one satisfies ``wanted``; Abort naming ``what`` on time-out, exit or a refused frame."""
        deadline = time.monotonic() + timeout
        while True:
            item = self.next(deadline)
            if item is None:
                raise Abort(f"no {what} within {timeout:g} s{self.exit_note()}")
            if wanted(item.message):
                return item
            if isinstance(item.message, Heartbeat):
                continue  # a worker may send heartbeats at any time (keepalives while busy)
            problem = refuse(item.message) if refuse is not None else ""
            if problem:
                raise Abort(problem)

    def expect_a(self, kind: type[M], what: str, timeout: float,
                 refuse: Callable[[Message], str] | None = None) -> M:
        """The next message of type ``kind`` (see ``expect``)."""
        message = self.expect(lambda m: isinstance(m, kind), what, timeout, refuse).message
        assert isinstance(message, kind)  # what the predicate accepted
        return message

    def steps(self, count: int, timeout: float) -> list[tuple[float, Step]]:
        """The next ``count`` steps (a ``steps`` frame counts for its rows) with their arrival times; Abort when
        another message type comes."""
        got: list[tuple[float, Step]] = []
        while len(got) < count:
            item = self.expect(lambda m: isinstance(m, Step | Steps), "step frame", timeout,
                               refuse=lambda m: f"unexpected {m.TAG} while waiting for steps")
            rows = item.message.rows() if isinstance(item.message, Steps) else [item.message]
            got.extend((item.at, row) for row in rows if isinstance(row, Step))
        return got

    def wait_exit(self, timeout: float) -> int | None:
        """Exit status within ``timeout`` (frames keep being read meanwhile); None if it is still running."""
        deadline = time.monotonic() + timeout
        while self.popen.poll() is None and time.monotonic() < deadline:
            self.next(min(deadline, time.monotonic() + 0.05))
        return self.popen.poll()

    def send(self, message: Message) -> None:
        self.send_raw(encode(message, self.version))

    def send_raw(self, *parts: bytes) -> None:
        if self.identity is not None:
            with contextlib.suppress(zmq.ZMQError):
                self.harness.socket.send_multipart([self.identity, *parts], zmq.NOBLOCK)

    def signal_group(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signum)

    def kill(self) -> None:
        """SIGKILL the whole process group (and an intermediate parent) and reap the leader (bounded)."""
        if isinstance(self.popen, Adopted):
            self.popen.kill_parent()  # first: the worker then becomes the kit's child, which it reaps
        self.signal_group(signal.SIGKILL)
        deadline = time.monotonic() + 10
        while self.popen.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)

    def rss(self) -> int:
        """Resident set of the worker process now (0 when it cannot be read)."""
        try:
            return int(psutil.Process(self.popen.pid).memory_info().rss)
        except psutil.Error:
            return 0

    def exit_note(self) -> str:
        code = self.popen.poll()
        if code is None:
            return ""
        tail = self.harness.stderr_tail(self)
        return f" (worker exited with {code}{'; stderr: ' + tail if tail else ''})"


class Harness:
    """A private 0700 directory with the ROUTER socket, the checkpoint directory and the workers' logs."""

    def __init__(self, argv: Sequence[str], options: Options) -> None:
        self.argv = list(argv)
        self.options = options
        self.dir = Path(tempfile.mkdtemp(prefix="mlxsup-conf-"))
        os.chmod(self.dir, 0o700)
        self.checkpoints = self.dir / "checkpoints"
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        # Take in whatever a worker sends at once, however far behind the kit's reading is: a full queue here would
        # leave frames in the worker's, where its bounded linger drops them at exit (its goodbye last of all).
        self.socket.setsockopt(zmq.RCVHWM, 0)
        self.socket.setsockopt(zmq.LINGER, 0)
        path = self.dir / "w.sock"
        self.socket.bind(f"ipc://{path}")
        os.chmod(path, 0o600)
        self.endpoint = f"ipc://{path}"
        self.lives: list[Life] = []
        self.subreaper = False  # orphaned workers become the kit's children (set for the parent_died check)

    def spawn(self, batch: int, accum: int, extra_env: Mapping[str, str] | None = None,
              orphanable: bool = False, wrong_token: bool = False) -> Life:
        """Start the worker in its own process group with a fresh token and the MLXSUP_* environment (plus
        ``extra_env``: the kit's steering variables). ``orphanable``: through an intermediate parent that the
        kit can kill (``Adopted``). ``wrong_token``: the kit accepts another token than the one the worker
        gets, so its hello goes unanswered as a daemon leaves a stranger's."""
        token = secrets.token_hex(16)
        env = {**os.environ, "MLXSUP_ENDPOINT": self.endpoint, "MLXSUP_TOKEN": token, "MLXSUP_JOB": JOB,
               "MLXSUP_CHECKPOINT_DIR": str(self.checkpoints), "MLXSUP_BATCH": str(batch),
               "MLXSUP_ACCUM": str(accum), "MLXSUP_CHECKPOINT_EVERY": "0",
               "MLXSUP_KEEP_CHECKPOINTS": str(self.options.keep_checkpoints),
               "MLXSUP_ORPHAN_TIMEOUT": str(self.options.orphan_timeout), "MLXSUP_CACHE_LIMIT": "0",
               "MLXSUP_CACHE_CLEAR_BYTES": "0", "PYTHONUNBUFFERED": "1", **(extra_env or {})}
        index = len(self.lives) + 1
        argv = self.argv
        pid_file = self.dir / f"life{index}.pid"
        if orphanable:
            self.subreaper = self.subreaper or become_subreaper()
            argv = [sys.executable, "-c", PARENT, str(pid_file), *self.argv]
        with open(self.dir / f"life{index}.out", "wb") as out, open(self.dir / f"life{index}.err", "wb") as err:
            popen = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                     start_new_session=True, close_fds=True)
        process: Process = popen
        if orphanable:
            process = Adopted(self._pid_of(pid_file, popen), popen)
        life = Life(self, process, token, env, accepts=secrets.token_hex(16) if wrong_token else None)
        self.lives.append(life)
        return life

    def _pid_of(self, pid_file: Path, parent: subprocess.Popen[bytes]) -> int:
        """The worker's pid as the intermediate parent wrote it (bounded wait)."""
        deadline = time.monotonic() + self.options.timeout
        while time.monotonic() < deadline and parent.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                return int(pid_file.read_text())
            time.sleep(0.01)
        parent.kill()
        parent.wait(timeout=10)
        raise OSError(f"the intermediate parent gave no worker pid within {self.options.timeout:g} s")

    def receive(self, life: Life, timeout: float) -> Received | None:
        """One frame for ``life`` within ``timeout`` seconds (frames of earlier lives are dropped)."""
        if not self.socket.poll(int(timeout * 1000)):
            return None
        parts = self.socket.recv_multipart(zmq.NOBLOCK)
        at = time.monotonic()
        if len(parts) != 2:
            life.bad_frames.append(f"{len(parts) - 1}-part message")
            return None
        identity, frame = parts
        try:
            message = decode(frame)
        except ProtocolError as exc:
            life.bad_frames.append(str(exc))
            return None
        if life.identity is None and isinstance(message, Hello):
            life.identity = identity  # recorded whatever its token: the hello check judges the token
            if message.token == life.accepts:
                version = min(max(message.protocol, 1), PROTOCOL_VERSION)
                life.send(Welcome(version))
                life.version = version
        elif life.identity is None and isinstance(message, Heartbeat) and message.token == life.token:
            pass  # a sign of life before the hello (a long load): this life's, by its token
        elif identity != life.identity:
            return None
        if isinstance(message, CheckpointSaved):
            life.verified[message.step] = self.inspect(message)
        item = Received(at, message, frame_version(frame) if life.read_versions else 0)
        life.received.append(item)
        return item

    def inspect(self, saved: CheckpointSaved) -> Verified:
        """Verify a checkpoint right when it is announced (it may be pruned later)."""
        path = Path(saved.path)
        expected = self.checkpoints / checkpoint_name(saved.step)
        if path != expected:
            return Verified(False, f"path {saved.path} is not {expected}")
        try:
            meta = verify(path)
        except CheckpointDamaged as exc:
            return Verified(False, f"{path.name}: {exc}")
        unlisted = unlisted_files(path, meta)
        if unlisted:
            return Verified(False, f"{path.name}: files not listed in meta.json: {unlisted[:5]}")
        total = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        if saved.nbytes != total:
            return Verified(False, f"nbytes {saved.nbytes} but the files hold {total} bytes")
        scratch = [p.name for p in self.checkpoints.glob(f".tmp-ckpt-{saved.step}-*")]
        if scratch:
            return Verified(False, f"temporary directory {scratch[0]} left beside {path.name}")
        return Verified(True, f"{path.name}: {len(meta['files'])} file(s), sha256 verified, {total} bytes")

    def stderr_tail(self, life: Life, chars: int = 300) -> str:
        index = self.lives.index(life) + 1
        try:
            text = (self.dir / f"life{index}.err").read_bytes()[-chars:]
        except OSError:
            return ""
        return text.decode(errors="replace").strip().replace("\n", " | ")

    def close(self) -> None:
        """Kill every life's process group, close the socket, remove the directory (unless kept)."""
        for life in self.lives:
            life.kill()
        self.socket.close(linger=0)
        self.context.term()
        if not self.options.keep_files:
            shutil.rmtree(self.dir, ignore_errors=True)
