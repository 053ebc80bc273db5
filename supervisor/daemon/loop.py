"""The daemon's single poll loop: worker sockets, control, signals and deadlines, all in one thread.

The poll timeout is the time to the next deadline (next sample, heartbeat, a job's hang or checkpoint
deadline, a backoff's end). Signal handlers only set flags and wake the loop through a self-pipe.
"""

from __future__ import annotations

import functools
import math
import os
import signal
import socket
import time
from collections.abc import Callable
from types import FrameType
from typing import Any, Protocol

import structlog
import zmq

from protocol import MAX_MESSAGE_BYTES, Heartbeat, Hello, ProtocolError, Welcome, decode, encode, negotiate
from supervisor.config import Config
from supervisor.core.sizes import parse_bytes, parse_fraction_of
from supervisor.core.states import TERMINAL_STATES
from supervisor.daemon import standby
from supervisor.daemon.job import Job, JobPaths
from supervisor.daemon.rundir import ipc_socket, lock_run_dir, prepare_run_dir
from supervisor.daemon.system import RealSystem, System

log = structlog.get_logger("mlxsupd")
MAX_DRAIN = 1000
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)
CRITICAL_PRESSURE = 4  # kern.memorystatus_vm_pressure_level: 1 normal, 2 warn, 4 critical
_growth_rate = functools.lru_cache(maxsize=4)(parse_bytes)  # daemon.growth_rate, read at every sample turn
_READS_MEMORY = frozenset({"WAITING_FOR_MEMORY", "CHECKPOINTING"})  # job states whose tick needs available memory


SocketHandlers = dict[zmq.Socket[bytes], Callable[[float], None]]


class Hooks(Protocol):
    """What a mode of the daemon adds to the loop (the service: control sockets, events, reload)."""

    def sockets(self) -> SocketHandlers:
        """Extra sockets to poll, with their handlers; asked once, when the loop starts."""

    def publish(self, job: str, kind: str, data: dict[str, Any]) -> None:
        """An event of a job (kind: telemetry, state, decision, log)."""

    def wants(self, job: str, kind: str) -> bool:
        """Whether an event of that kind would reach anyone (so a costly one is built only then)."""

    def on_reload(self, now: float) -> None:
        """SIGHUP arrived."""

    def on_turn(self, daemon: Daemon, now: float) -> None:
        """Called once per loop turn, after the jobs."""


class NoHooks:
    """The plain loop: nothing to add."""

    def sockets(self) -> SocketHandlers:
        return {}

    def publish(self, job: str, kind: str, data: dict[str, Any]) -> None:
        pass

    def wants(self, job: str, kind: str) -> bool:
        return False

    def on_reload(self, now: float) -> None:
        pass

    def on_turn(self, daemon: Daemon, now: float) -> None:
        pass


class Daemon:
    """Supervises the configured jobs until told to stop (or, in one-shot mode, until they are done)."""

    def __init__(
        self, config: Config, job_names: list[str] | None = None, system: System | None = None,
        one_shot: bool = False, hooks: Hooks | None = None,
    ) -> None:
        self.config = config
        self.system = system or RealSystem(log_max=parse_bytes(config.daemon.log_max_bytes),
                                           log_keep=config.daemon.log_keep)
        self.one_shot = one_shot
        self.hooks: Hooks = hooks or NoHooks()
        self.run_dir = prepare_run_dir(config.run_dir)
        self._lock = lock_run_dir(self.run_dir)
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.workers = self._bind_worker_socket()
        self.jobs: dict[str, Job] = {}
        self.by_identity: dict[bytes, Job] = {}
        self.stopping = False
        self.stopped_by = "local"  # who asked for the shutdown (a signal counts as local), for the jobs' history
        self.reload_requested = False
        self.extra_sockets: SocketHandlers = {}
        self._end = float("inf")
        self._next_heartbeat = self._last_turn = 0.0
        self._shutdown_started = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        _, total = self.system.memory()
        self.total_memory = total
        self.floor = parse_fraction_of(config.daemon.system_floor, total)
        self.hysteresis = parse_fraction_of(config.daemon.floor_hysteresis, total)
        for name in job_names if job_names is not None else list(config.jobs):
            self.add_job(name)

    # -- setup ----------------------------------------------------------------------------------------

    def _bind_worker_socket(self) -> zmq.Socket[bytes]:
        sock = self.context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        sock.setsockopt(zmq.RCVHWM, 10_000)  # bounds what a flood can queue inside libzmq
        sock.setsockopt(zmq.SNDHWM, 1_000)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        path = ipc_socket(self.run_dir, "workers.sock")
        path.unlink(missing_ok=True)
        sock.bind(f"ipc://{path}")
        os.chmod(path, 0o600)
        self.worker_endpoint = f"ipc://{path}"
        return sock

    def add_job(self, name: str) -> Job:
        """Supervise job ``name`` of the config; a job that is still here (even stopping) is never replaced."""
        if name in self.jobs:
            raise ValueError(f"job {name!r} is already supervised")
        job_config = self.config.jobs[name]
        job_dir = self.config.job_dir(name)
        paths = JobPaths(self.config.checkpoint_dir(name), self.config.log_dir / "jobs" / name,
                         job_dir / "history.jsonl", job_dir / "telemetry.jsonl", self.run_dir / f"ring-{name}.json")
        orphan = max(3.0, 5 * self.config.daemon.heartbeat_interval)
        job = Job(name, job_config, job_config.limits(self.total_memory), paths, self.system,
                  self.worker_endpoint, self._send_to_worker, self.hooks.publish, orphan_timeout=orphan,
                  telemetry_max=parse_bytes(self.config.daemon.log_max_bytes),
                  telemetry_keep=self.config.daemon.log_keep, layout=self.config.layout(name),
                  wants=self.hooks.wants)
        self.jobs[name] = job
        return job

    def _send_to_worker(self, identity: bytes, frame: bytes) -> None:
        try:
            self.workers.send_multipart([identity, frame], zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # peer gone or queue full: the worker's own deadlines cover it
            log.debug("send_to_worker_failed", error=str(exc))

    # -- signals --------------------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_stop_signal)
        signal.signal(signal.SIGHUP, self._on_hup)
        signal.signal(signal.SIGCHLD, lambda s, f: None)  # only to wake the poll through the wakeup fd

    def _on_stop_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True

    def _on_hup(self, signum: int, frame: FrameType | None) -> None:
        self.reload_requested = True

    # -- the loop -------------------------------------------------------------------------------------

    def run(self, max_seconds: float | None = None) -> int:
        """Run the loop; returns an exit status. Bounded by ``max_seconds`` when given."""
        now = self.system.now()
        self._end = now + max_seconds if max_seconds else float("inf")
        self._next_heartbeat = now
        self._shutdown_started = False
        self.extra_sockets = self.hooks.sockets()
        poller = zmq.Poller()
        poller.register(self.workers, zmq.POLLIN)
        poller.register(self._wake_r.fileno(), zmq.POLLIN)
        for sock in self.extra_sockets:
            poller.register(sock, zmq.POLLIN)
        try:
            while True:
                self._turn(self.system.now())
                if self._done(self._shutdown_started):
                    return 0
                self._wait(poller)
        finally:
            self._kill_all()

    def _turn(self, now: float) -> None:
        """Everything due now: shutdown, reload, samples, heartbeats, job deadlines."""
        self._last_turn = now
        if now >= self._end:
            log.warning("daemon_time_limit")
            self._end = float("inf")
            self.stopping = True
        if self.stopping and not self._shutdown_started:
            self._shutdown_started = True
            log.info("daemon_stopping", jobs=len(self.jobs))
            for job in self.jobs.values():
                job.shutdown(now, self.stopped_by)
        if self.reload_requested:
            self.reload_requested = False
            self.hooks.on_reload(now)
        if self._sample_all(now):
            for job in self.jobs.values():
                job.recorder.flush_due()  # telemetry lines reach the file within about a second
        if now >= self._next_heartbeat:
            self._heartbeat_all()
            self._next_heartbeat = now + self.config.daemon.heartbeat_interval
        self._drain_workers(now)  # a worker's last messages are handled before its exit is
        available = self._available() if self._needs_memory() else self.total_memory
        for job in list(self.jobs.values()):
            job.tick(now, available, self.floor + self.hysteresis)
        self.hooks.on_turn(self, now)

    def _wait(self, poller: zmq.Poller) -> None:
        """Poll until the next deadline (at most 1 s), then serve whatever became readable."""
        jobs = (job.next_deadline() for job in self.jobs.values())
        deadlines = [self._next_heartbeat, self._end, *jobs]
        if not self._resting():
            deadlines.append(self._next_sample())  # sample turns only while some job lives
            if any(job.layout is not None for job in self.jobs.values()):  # a gang's links talk from the turns
                deadlines.append(self._last_turn + self.config.daemon.sample_interval)
        timeout_ms = max(0, min(1000, int((min(deadlines) - self.system.now()) * 1000) + 1))
        events = dict(poller.poll(timeout_ms))
        now = self.system.now()
        if self.workers in events:
            self._drain_workers(now)
        if self._wake_r.fileno() in events:
            self._drain_wakeups()
        for sock, handler in self.extra_sockets.items():
            if sock in events:
                handler(now)

    def _resting(self) -> bool:
        """Every job is stopped, finished or fatal with no process left, and none follows a gang leader (its link
        talks to the leader from the turns): nothing to sample or to coordinate, so the loop wakes for sockets,
        deadlines and at least once a second (an idle daemon costs almost no CPU)."""
        return all(j.state in TERMINAL_STATES and not j.busy and not j.lifecycle.settings.follower
                   for j in self.jobs.values())

    def _done(self, shutdown_started: bool) -> bool:
        busy = any(j.busy for j in self.jobs.values())
        if shutdown_started:
            return not busy
        if self.one_shot:
            return not busy and all(j.state in TERMINAL_STATES for j in self.jobs.values())
        return False

    def _available(self) -> int:
        """Available memory for the floor; macOS' critical pressure level counts as none available."""
        available = self.system.memory()[0]
        if self.system.pressure() == CRITICAL_PRESSURE:
            return 0
        return available

    def _needs_memory(self) -> bool:
        # CHECKPOINTING too: a worker that leaves for the floor is reaped in this turn's tick, which then puts its
        # job in WAITING_FOR_MEMORY and hands it this figure; total memory there would restart it at once.
        return bool(self.floor) and any(j.state.name in _READS_MEMORY for j in self.jobs.values())

    def _next_sample(self) -> float:
        """When the next job is due for a sample: 20 Hz near a budget, less often far from it (``sample_gap``)."""
        interval = self.config.daemon.sample_interval
        return min((job.next_sample(interval) for job in self.jobs.values()), default=math.inf)

    def _sample_all(self, now: float) -> bool:
        """Sample every job that is due; whether any was."""
        d = self.config.daemon
        due = [j for j in self.jobs.values() if now >= j.next_sample(d.sample_interval)]
        if not due:
            return False
        available = self._available() if self.floor else self.total_memory
        cadence = (d.sample_interval, d.calm_sample_interval, float(_growth_rate(d.growth_rate)))
        for job in due:
            job.on_sample(now, available, self.floor, cadence)
        return True

    def _heartbeat_all(self) -> None:
        sent_at, hold = time.time(), self.config.daemon.telemetry_hold
        for job in self.jobs.values():
            standby.heartbeat(job, sent_at, self._send_to_worker)
            if job.identities:
                beat = job.heartbeat(sent_at, hold)
                frames: dict[int, bytes] = {}  # one frame per negotiated version (every rank the same, mostly)
                for rank, identity in job.identities.items():
                    version = job.protocol_of(rank)
                    frame = frames.get(version) or frames.setdefault(version, encode(beat, version))
                    self._send_to_worker(identity, frame)

    def _drain_workers(self, now: float) -> None:
        # Most calls find nothing (a sample turn): one EVENTS look, in plain ints (masking with the zmq.POLLIN
        # enum member builds a flag object). Otherwise frames are taken until EAGAIN, one look for a whole batch.
        if not int(self.workers.getsockopt(_EVENTS)) & _POLLIN:
            return
        for _ in range(MAX_DRAIN):
            try:
                frames = self.workers.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 2:
                log.warning("worker_frame_rejected", problem=f"{len(frames)} frames, expected 1")
                continue
            identity, frame = frames
            try:
                message = decode(frame)
            except ProtocolError as exc:
                log.warning("worker_frame_rejected", problem=str(exc))
                continue
            if standby.route(self.jobs.values(), message, identity, now, self._send_to_worker):
                continue  # a standby's frame (supervisor.daemon.standby)
            job = self.by_identity.get(identity)
            if isinstance(message, Hello):
                self._on_hello(message, identity, now)
            elif job is not None and (rank := job.rank_of(identity)) is not None:
                job.on_message(message, now, rank)
            elif isinstance(message, Heartbeat) and message.token and (early := self._job_of(message.token)):
                early.heard_before_hello(message.token, now)  # alive before its hello (loading a model): not hung
            else:
                log.warning("worker_message_ignored", type=message.TAG, reason="unknown peer (no valid hello)")

    def _job_of(self, token: str) -> Job | None:
        """The job whose current worker was spawned with ``token``."""
        return next((j for j in self.jobs.values() if j.accepts(token)), None)

    def _on_hello(self, hello: Hello, identity: bytes, now: float) -> None:
        job = self._job_of(hello.token)
        if job is None:
            log.warning("worker_hello_rejected", pid=hello.pid, job=hello.job[:64], reason="bad spawn token")
            return
        try:
            version = negotiate(hello.protocol)
        except ProtocolError as exc:
            log.warning("worker_hello_rejected", pid=hello.pid, job=job.name, reason=str(exc))
            return
        known = set(job.identities.values())
        self.by_identity = {k: v for k, v in self.by_identity.items() if v is not job or k in known}
        self.by_identity[identity] = job
        job.on_hello(hello, identity, now, version)
        self._send_to_worker(identity, encode(Welcome(version), version))
        self._send_to_worker(identity, encode(job.heartbeat(time.time(), self.config.daemon.telemetry_hold), version))

    def _drain_wakeups(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _kill_all(self) -> None:
        """Last resort on the way out: no worker outlives the daemon's loop unsupervised.

        Current workers get SIGTERM (the SDK checkpoints at its next step boundary), departing ones SIGKILL
        (their checkpoint is durable); whatever is left after 5 s gets SIGKILL, and everything is reaped.
        """
        procs = [(proc.pid in job.current_pids(), proc) for job in self.jobs.values() for proc in job.procs.values()]
        for current, proc in procs:
            if proc.poll() is None:
                proc.signal_group(signal.SIGTERM if current else signal.SIGKILL)
        deadline = time.monotonic() + 5
        for final in (False, True):
            for _, proc in procs:
                while proc.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.02)
                if proc.poll() is None and not final:
                    proc.signal_group(signal.SIGKILL)
            deadline += 2

    def close(self) -> None:
        for job in self.jobs.values():
            job.recorder.close()
        self.workers.close(linger=0)
        for sock in self.extra_sockets:
            sock.close(linger=0)
        self.context.destroy(linger=0)
        self._wake_r.close()
        self._wake_w.close()
        path = self.run_dir / "workers.sock"
        path.unlink(missing_ok=True)
        self._lock.close()
