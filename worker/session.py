"""The Session SDK: what a training loop calls to be supervised.

Everything the daemon asks for happens inside ``end_step``, at a step boundary, so a checkpoint never holds a
half-updated model. Without a supervisor (no ``MLXSUP_ENDPOINT`` in the environment) the same calls still
checkpoint and resume; telemetry and commands are simply skipped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import mlx.core as mx
import zmq
from mlx.utils import tree_flatten, tree_unflatten

from protocol import (
    PROTOCOL_VERSION,
    Census,
    CheckpointSaved,
    Command,
    Go,
    Goodbye,
    Heartbeat,
    Hello,
    ProtocolError,
    Standby,
    Step,
    Welcome,
    decode_parts,
)
from protocol.footprint import self_footprint
from protocol.messages import EXIT_CHECKPOINTED
from worker import checkpoint as ckpt
from worker import gang as gang_mod
from worker.census import Taker
from worker.gang import Gang
from worker.hold import StepHold, batch_frames
from worker.pulse import KEEPALIVE_EVERY, Pulse
from worker.standby import FEATURE, POLL_MS, Orders
from worker.steering import Steering

ENV_PREFIX = "MLXSUP_"
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)
NOT_MEASURED_SINCE = 2  # protocol version from which a step may say "not measured" (nil) for MLX memory


def _counter(name: str) -> Callable[[], int] | None:
    """MLX's memory counter ``name`` (older MLX has it under ``mx.metal`` only); None when this MLX has none."""
    for owner in (mx, getattr(mx, "metal", None)):
        function = getattr(owner, name, None)
        if callable(function):
            return function  # type: ignore[no-any-return]
    return None


_ACTIVE, _CACHE = _counter("get_active_memory"), _counter("get_cache_memory")


def _measured(counter: Callable[[], int] | None, version: int) -> int | None:
    """A counter's bytes; None when it cannot be measured (0 to a version 1 daemon, which has no "not measured")."""
    if counter is not None:
        try:  # per step: a plain try costs nothing, contextlib.suppress builds an object each call
            return int(counter())
        except (RuntimeError, ValueError):
            pass
    return None if version >= NOT_MEASURED_SINCE else 0


@dataclasses.dataclass(frozen=True)
class Resumed:
    """Where a run starts: step 0 on a fresh run, else the step of the checkpoint loaded."""

    step: int
    extra: dict[str, Any]
    path: Path | None


@dataclasses.dataclass(frozen=True)
class SessionSettings:
    """Per-spawn settings the daemon passes in the environment (all optional)."""

    endpoint: str = ""
    token: str = ""
    job: str = "standalone"
    checkpoint_dir: str = ""
    batch: int = 0
    accum: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 3
    orphan_timeout: float = 5.0
    cache_limit: int = 0
    cache_clear_bytes: int = 0
    standby: int = 0  # 1: spawned as a standby, which waits for the daemon's go (worker.standby)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> SessionSettings:
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            raw = env.get(ENV_PREFIX + field.name.upper())
            if raw is None or raw == "":
                continue
            kind: type[Any] = type(field.default)
            try:
                values[field.name] = kind(raw)
            except ValueError:
                raise ValueError(f"{ENV_PREFIX}{field.name.upper()}={raw!r} is not a valid {kind.__name__}") from None
        return cls(**values)


class Session:
    """Connection of one training process to its supervisor (or a standalone stand-in)."""

    def __init__(self, settings: SessionSettings, target_steps: int, batch: int, accum: int = 1,
                 gang: Gang | None = None) -> None:
        self.settings = settings
        self.gang = gang
        self.target_steps = target_steps
        # The daemon's choice (after a shrink) wins over the script's defaults.
        self.batch = settings.batch or batch
        self.accum = settings.accum or accum
        self._model: Any = None
        self._optimizer: Any = None
        self._trainable_only = False
        self._last_heard = math.inf  # the daemon says nothing before our hello: its silence counts from then
        self._last_end = time.perf_counter()
        self._stop_reason = ""  # set by SIGTERM or the watchdog
        self._exit_reason = ""  # a pending wish to checkpoint and exit, until acted on
        self._want_checkpoint = False  # a pending wish to checkpoint, until acted on
        self._hello_sent = False
        self._stepped = False  # a step boundary was reached (before it, SIGTERM ends the process at once)
        self._version = 1  # the protocol version of our frames: 1 until the daemon's welcome says more
        self.fast_exit = False
        self.steering = Steering()  # what the conformance kit asks of this worker (from_env reads it)
        self._context: zmq.Context[zmq.Socket[bytes]] | None = None
        self._socket: zmq.Socket[bytes] | None = None
        self._lock = threading.Lock()  # the socket, shared with the pulse thread
        self._inbox: list[Command] = []  # commands received, handled at the next step boundary
        self._hold = StepHold()  # steps held while memory is far from the daemon's bands
        self._pulse: Pulse | None = None
        self._census = Taker()  # a census the daemon asked for (``mlxsupctl diagnose``)
        self._go: Go | None = None  # a standby's orders, once the daemon sent them
        if settings.endpoint:
            self._connect()
        if settings.cache_limit:
            mx.set_cache_limit(settings.cache_limit)

    @classmethod
    def from_env(
        cls, target_steps: int, batch: int, accum: int = 1, handle_sigterm: bool = True, fast_exit: bool = True
    ) -> Session:
        """Build a session from the ``MLXSUP_*`` environment the daemon sets; standalone when it is absent.

        ``fast_exit``: leave with ``os._exit(75)`` once the checkpoint is durable, skipping interpreter
        teardown (freeing gigabytes of leaked arrays takes longer than the restart); False raises SystemExit.
        """
        session = cls(SessionSettings.from_env(os.environ), target_steps, batch, accum, Gang.from_env(os.environ))
        session.fast_exit = fast_exit
        session.steering = Steering.from_env(os.environ)
        if handle_sigterm and session.supervised:
            signal.signal(signal.SIGTERM, session._on_sigterm)
        return session

    @property
    def supervised(self) -> bool:
        """True when a daemon spawned this process."""
        return self._socket is not None

    @property
    def checkpoint_dir(self) -> Path | None:
        return Path(self.settings.checkpoint_dir) if self.settings.checkpoint_dir else None

    def keepalive(self) -> None:
        """Tell the daemon this worker is alive (from any thread); a no-op without a daemon."""
        if self._pulse is not None:
            self._pulse.keepalive()

    def busy(self, what: str) -> contextlib.AbstractContextManager[None]:
        """``with session.busy("validation"):`` keeps heartbeats going while a long model load, compile,
        evaluation or save runs, so the daemon's ``hang_timeout`` does not fire."""
        return self._pulse.busy(what) if self._pulse is not None else contextlib.nullcontext()

    def resume(self, model: Any, optimizer: Any, *, trainable_only: bool = False) -> Resumed:
        """Attach the model and optimizer to checkpoint, and load the newest good checkpoint into them.

        ``trainable_only``: checkpoint ``model.trainable_parameters()`` only (a fine-tune's adapters, not the
        frozen base model, which is reloaded from its own files). In a gang every rank must call it: the ranks
        agree on the newest step all of them can load.
        """
        self.standby()  # a standby waits here for its go, before anything is loaded
        self._model, self._optimizer = model, optimizer
        self._trainable_only = trainable_only
        loaded: ckpt.Checkpoint | None = None
        extra: dict[str, Any] = {}
        # Heartbeats with the token while a large checkpoint loads (before the hello); not in a gang, whose ranks
        # wait for each other here: a rank blocked on a lost peer must not look alive.
        with self.busy("load") if self.gang is None else contextlib.nullcontext():
            time.sleep(self.steering.load_seconds)
            if self.checkpoint_dir is not None and self.gang is not None:
                loaded, extra = gang_mod.resume(self.gang, self.checkpoint_dir, log=self._log)
            elif self.checkpoint_dir is not None:
                loaded = ckpt.load_latest(self.checkpoint_dir, log=self._log)
                extra = dict(loaded.meta.get("extra", {})) if loaded is not None else {}
        if loaded is None:
            resumed = Resumed(step=0, extra={}, path=None)
        else:
            model.update(tree_unflatten(list(loaded.model.items())))
            optimizer.state = tree_unflatten(list(loaded.optimizer.items()))
            mx.eval(model.parameters(), optimizer.state)
            resumed = Resumed(step=loaded.step, extra=extra, path=loaded.path)
        self._say_hello(resumed.step)
        self._last_end = time.perf_counter()
        return resumed

    def standby(self) -> Orders | None:
        """A standby's wait for the daemon's go (``worker.standby.wait_for_go``): None when this process is not
        a standby; else block until go, take its batch and accumulation, and return its orders."""
        if not self.settings.standby or self._socket is None:
            return None
        if self._go is None:
            self._wait_for_go()
        assert self._go is not None
        self.batch, self.accum = self._go.batch, self._go.accum
        return Orders.of(self._go)

    def _wait_for_go(self) -> None:
        """Say ``standby``, then poll the socket until go; leave at once (75) when orphaned: nothing to save."""
        assert self._socket is not None and self._pulse is not None
        self._send(Standby(self.settings.token, os.getpid(), self.settings.job, PROTOCOL_VERSION))
        beat = time.monotonic()
        while self._go is None:
            with self._lock:
                if time.monotonic() - beat >= KEEPALIVE_EVERY:  # the daemon sees a waiting standby, not a hung one
                    beat = time.monotonic()
                    self._heartbeat_locked()
                self._socket.poll(POLL_MS, zmq.POLLIN)
                self._drain_locked()
            reason = self._pulse.orphan_reason()
            if reason and self._go is None:
                self._log("standby_exit", {"reason": reason})
                sys.stderr.flush()
                os._exit(EXIT_CHECKPOINTED)
        self._version = 1  # the hello is written in version 1, as always; its welcome sets the version again

    def average_gradients(self, grads: Any) -> Any:
        """Average ``grads`` over the gang (``mlx.nn.average_gradients``), carrying this rank's pending
        checkpoint or exit wish in the same all-reduce; returns ``grads`` unchanged outside a gang."""
        if self.gang is None:
            return grads
        self._take(self._poll() if self._socket is not None else [])
        with self.collective("all_sum"):
            averaged = self.gang.fold(grads, self._want_checkpoint, bool(self._exit_reason))
        self._want_checkpoint = False
        return averaged

    def collective(self, what: str) -> contextlib.AbstractContextManager[None]:
        """``with session.collective("all_sum"):`` around a collective the loop evaluates itself: a rank that
        blocks inside it (a peer stopped, lost or deadlocked) tells the daemon so, and a gang hang names it."""
        return self._pulse.collective(what) if self._pulse is not None else contextlib.nullcontext()

    def end_step(self, step: int, loss: float, extra: dict[str, Any] | None = None, *,
                 tokens_per_second: float | None = None, val_loss: float | None = None) -> None:
        """Report optimizer step ``step`` (1-based count of steps done) and act on pending commands.

        ``tokens_per_second`` and ``val_loss`` (when this step was validated) are optional telemetry.
        May not return: on checkpoint-and-exit it saves, says goodbye and exits with status 75. In a gang every
        rank calls it at every step, and the ranks act on the same decision (see ``worker.gang``).
        """
        if self.steering.slow_every and self.steering.slow(step):
            with self.busy("long step"):  # the kit's long step: keepalives, and the watchdog, meanwhile
                time.sleep(self.steering.slow_seconds)
        now = time.perf_counter()
        if self._socket is not None:
            if not self._hello_sent:
                self._say_hello(step - 1)
            version = self._version
            self._send(Step(step, self.batch, self.accum, float(loss), round(now - self._last_end, 6),  # µs
                            _measured(_ACTIVE, version), _measured(_CACHE, version), mx.get_peak_memory(),
                            self_footprint(), tokens_per_second, val_loss))
            mx.reset_peak_memory()
        self._stepped = True
        self._last_end = now
        settings = self.settings
        if settings.cache_clear_bytes and mx.get_cache_memory() > settings.cache_clear_bytes:
            mx.clear_cache()
        self._take(self._poll() if self._socket is not None else [])
        if self._census.steps:  # the caller's frame is the training loop whose names the census counts
            answer = self._census.at_boundary(sys._getframe(1), step, self._model, self._optimizer)
            if answer is not None:
                self._send(answer)
        want_checkpoint, exit_reason = self._decide()
        if exit_reason and step >= self.target_steps:
            exit_reason = ""  # the loop is about to finish (and checkpoint) anyway
        if exit_reason and self._pulse is not None:
            self._pulse.leaving = True  # the watchdog gives the checkpoint on the way out time to land
        periodic = settings.checkpoint_every and step % settings.checkpoint_every == 0
        if exit_reason or periodic or want_checkpoint:
            self.save(step, extra)
        if exit_reason:
            self._leave(exit_reason, step, EXIT_CHECKPOINTED)

    def _take(self, commands: list[Command]) -> None:
        """Note what the daemon (or a signal, or the watchdog) asks of this rank until it is acted on."""
        for command in commands:
            if command.action == Command.CLEAR_CACHE:
                mx.clear_cache()
            elif command.action == Command.CHECKPOINT:
                self._want_checkpoint = True
            elif command.action == Command.CENSUS:
                self._census.ask(command.steps or 50)
            elif command.action == Command.CHECKPOINT_EXIT and not self._exit_reason:
                self._exit_reason = command.reason or "asked"
        if self._stop_reason and not self._exit_reason:
            self._exit_reason = self._stop_reason

    def _decide(self) -> tuple[bool, str]:
        """(checkpoint now, exit reason): this process's own wishes, or in a gang what the gang agreed."""
        if self.gang is None:
            want, self._want_checkpoint = self._want_checkpoint, False
            return want, self._exit_reason
        with self.collective("all_max"):  # only when no fold ran this step; else the flags are already here
            want_checkpoint, want_exit = self.gang.agree(self._want_checkpoint, bool(self._exit_reason))
        if want_checkpoint:
            self._want_checkpoint = False
        reason = (self._exit_reason or "gang: a peer rank was asked") if want_exit else ""
        return want_checkpoint, reason

    def save(self, step: int, extra: dict[str, Any] | None = None) -> Path | None:
        """Write a durable checkpoint of the attached model and optimizer; None when no directory is set.

        In a gang this is collective (every rank calls it at the same step): see ``worker.gang.save``."""
        if self.checkpoint_dir is None or self._model is None:
            return None
        started = time.perf_counter()
        meta = {"batch": self.batch, "accum": self.accum, "job": self.settings.job, "extra": extra or {}}
        params = self._model.trainable_parameters() if self._trainable_only else self._model.parameters()
        model = dict(tree_flatten(params))
        optimizer = dict(tree_flatten(self._optimizer.state))
        keep = self.settings.keep_checkpoints
        if self.gang is not None:
            meta["ranks"] = self.gang.size
            with self.busy("gang checkpoint"):  # peers wait in a barrier meanwhile: keep them from looking hung
                path = gang_mod.save(self.gang, self.checkpoint_dir, step, model, optimizer, meta, keep)
        else:
            path = ckpt.save_checkpoint(self.checkpoint_dir, step, model, optimizer, meta, keep=keep)
        nbytes = sum(f.stat().st_size for f in path.iterdir())
        self._send(CheckpointSaved(step, str(path), time.perf_counter() - started, nbytes))
        return path

    def finish(self, step: int, extra: dict[str, Any] | None = None) -> None:
        """Training is done: save a final checkpoint and tell the daemon (the process may then exit 0)."""
        self.save(step, extra)
        self._send(Goodbye("finished", step))
        self.close()

    def close(self, linger_ms: int = 1000) -> None:
        """Flush pending telemetry (bounded by ``linger_ms``) and release the socket."""
        if self._pulse is not None:
            self._pulse.stop()
            self._pulse = None
        if self._socket is not None:
            with self._lock:
                self._send_all(self._hold.release())
            self._socket.close(linger=linger_ms)
            self._socket = None
        if self._context is not None:
            self._context.term()
            self._context = None

    def __enter__(self) -> Session:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------------------

    def _connect(self) -> None:
        self._context = zmq.Context()
        sock = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.SNDHWM, 10_000)
        sock.setsockopt(zmq.RCVHWM, 1_000)
        sock.setsockopt(zmq.MAXMSGSIZE, 64 * 1024)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.connect(self.settings.endpoint)
        self._socket = sock
        self._pulse = Pulse(self._lock, self._heartbeat_locked, self._drain_locked, lambda: self._last_heard,
                            self.settings.orphan_timeout, EXIT_CHECKPOINTED)
        self._pulse.start()

    def _say_hello(self, start_step: int) -> None:
        if self._socket is None or self._hello_sent:
            return
        self.standby()  # a standby says hello only after its go (then the daemon has made it the job's worker)
        self._hello_sent = True
        self._last_heard = time.time()  # the orphan timer starts (PROTOCOL.md 8): a long load is not silence
        self._send(Hello(self.settings.token, os.getpid(), self.settings.job, start_step,
                         self.target_steps, self.batch, self.accum, PROTOCOL_VERSION,  # written as v 1: any daemon
                         features=f"census {FEATURE}"))

    def _send(self, message: Hello | Step | CheckpointSaved | Goodbye | Heartbeat | Census | Standby) -> None:
        with self._lock:
            self._send_locked(message)

    def _send_locked(self, message: Hello | Step | CheckpointSaved | Goodbye | Heartbeat | Census | Standby) -> None:
        if self._socket is None:
            return
        if isinstance(message, Step):  # held as a message: held steps go out as one ``steps`` frame
            # nil mlx_active (not measured): the transient counts as 0 (PROTOCOL.md 3, Holding, exactly)
            transient = 0 if message.mlx_active is None else max(0, message.mlx_peak - message.mlx_active)
            self._send_all(self._hold.step(message, message.step, message.footprint, transient))
        elif isinstance(message, Heartbeat):
            self._send_all([message])  # a sign of life; held steps keep waiting
        else:
            self._send_all(self._hold.release(message))  # held steps first: the daemon sees everything in order

    def _send_all(self, messages: list[Any]) -> None:
        """Send ``messages`` in order; runs of steps as ``steps`` frames when the daemon allows them."""
        assert self._socket is not None
        for frame in batch_frames(messages, self._hold.rows, self._version):
            try:
                self._socket.send(frame, zmq.NOBLOCK)
            except zmq.Again:
                pass  # telemetry is best effort; the daemon samples our footprint itself

    def _waiting_locked(self, what: str, seconds: float) -> None:
        """Blocked inside collective ``what`` for ``seconds`` (the pulse thread, with the lock held)."""
        self._send_locked(Heartbeat(time.time(), self.settings.token, waiting=what, waiting_seconds=round(seconds, 3)))

    def _heartbeat_locked(self) -> None:
        # The token lets the daemon count this as a sign of life even before our hello (a long model load).
        self._send_locked(Heartbeat(time.time(), self.settings.token))

    def _poll(self) -> list[Command]:
        """Commands received since the last boundary; notes a lost or silent daemon."""
        with self._lock:
            self._drain_locked()
            commands, self._inbox = self._inbox, []
        if self._pulse is not None:
            self._stop_reason = self._stop_reason or self._pulse.orphan_reason()
        return commands

    def _drain_locked(self) -> None:
        """Read every pending frame (called with the lock held, by the loop or the pulse thread)."""
        sock = self._socket
        if sock is None:
            return
        # EVENTS is a cheap getsockopt; poll() would build a Poller per call on the per-step path. Plain ints:
        # masking with the zmq.POLLIN enum member builds a flag object every step.
        while int(sock.getsockopt(_EVENTS)) & _POLLIN:
            parts = sock.recv_multipart(zmq.NOBLOCK)
            try:
                message = decode_parts(parts)  # a multi-part message is refused whole, its first part unread
            except ProtocolError as exc:
                self._log("bad_frame_from_daemon", {"problem": str(exc)})
                continue
            if isinstance(message, Heartbeat):
                self._last_heard = max(self._last_heard, message.sent_at)
                self._hold.configure(message.hold, message.hold_below, message.hold_horizon, message.hold_rows)
                if message.report_waiting and self._pulse is not None:
                    self._pulse.send_waiting = self._waiting_locked
            elif isinstance(message, Command):
                self._last_heard = time.time()
                if self.settings.standby and self._go is None:
                    continue  # a standby before its go has nothing to act on (docs/PROTOCOL.md section 11)
                self._inbox.append(message)
                self._hold.stop_holding()
            elif isinstance(message, Welcome):  # our frames are written in the agreed version from now on
                self._last_heard = time.time()
                self._version = max(1, min(message.protocol, PROTOCOL_VERSION))
            elif isinstance(message, Go) and self.settings.standby and not self._hello_sent:
                self._last_heard = time.time()
                self._go = self._go or message
        if self._hold.due():  # the loop is slow to reach its next step: the pulse thread sends them
            self._send_all(self._hold.release())

    def _leave(self, reason: str, step: int, code: int) -> None:
        self._log("worker_exit", {"reason": reason, "step": step})
        self._send(Goodbye(reason, step))
        orphaned = reason in ("daemon_lost", "daemon_silent")
        self.close(0 if orphaned else 1000)  # lingers until the goodbye is delivered (bounded), unless alone
        if self.fast_exit:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        raise SystemExit(code)

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self._stop_reason = "sigterm"
        if not self._stepped:  # no step since the checkpoint it loaded: nothing to save, leave at once
            self._log("worker_exit", {"reason": "sigterm before the first step", "step": "-"})
            sys.stderr.flush()
            os._exit(EXIT_CHECKPOINTED)

    def _log(self, event: str, fields: dict[str, Any]) -> None:
        details = " ".join(f"{k}={v}" for k, v in fields.items())
        print(f"[worker {self.settings.job}] {event} {details}", file=sys.stderr, flush=True)

