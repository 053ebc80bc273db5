"""One supervised job: its lifecycle's actions carried out on processes, sockets and files.

Decisions are made by ``supervisor.core.lifecycle.Lifecycle``; the Job turns what happens (worker messages,
footprint samples, exits, operator requests, time) into events for it, and carries out the actions it returns:
spawn, command the worker, signal a process group, log, record and publish. OS effects go through
``supervisor.daemon.system``. A write that fails (full or read-only state directory) is counted and logged,
never raised: the daemon keeps supervising and enforcing budgets.
"""

from __future__ import annotations

import os
import secrets
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from protocol import CheckpointSaved, Command, Goodbye, Hello, Message, Step, encode
from protocol.checkpoints import latest_step
from supervisor.config import JobConfig, worker_argv
from supervisor.core import events as ev
from supervisor.core.events import Action, Event, Refused
from supervisor.core.lifecycle import JobStats, Life, Lifecycle, Settings
from supervisor.core.policy import Action as Do
from supervisor.core.policy import Limits, PolicyConfig
from supervisor.core.sizes import parse_bytes, parse_fraction_of
from supervisor.core.states import JobState
from supervisor.daemon.history import History
from supervisor.daemon.recorder import Recorder
from supervisor.daemon.system import System, WorkerProcess

Publish = Callable[[str, str, dict[str, Any]], None]  # (job, kind, data)
SendToWorker = Callable[[bytes, bytes], None]  # (identity, frame)
log = structlog.get_logger("mlxsupd")
IO_ERROR_LOG_EVERY = 60.0  # seconds between log lines about the same kind of failing write
# Log event names that differ from the history's (scripts and the fault campaign read the log by these).
LOG_NAMES = {"hello": "worker_hello", "exit": "worker_exit", "budget": "budget_changed"}
__all__ = ["Job", "JobPaths", "Refused", "settings_of"]


def settings_of(job: JobConfig) -> Settings:
    """The lifecycle settings of a job's config."""
    policy = PolicyConfig(
        leak_threshold=float(parse_bytes(job.leak_threshold)), shrink_factor=job.shrink_factor,
        min_batch=job.min_batch, max_batch=job.batch, keep_effective_batch=job.keep_effective_batch,
        min_steps_per_life=job.min_steps_per_life, regrow_after_steps=job.regrow_after_steps,
        adaptive=job.policy == "adaptive",
    )
    return Settings(
        policy=policy, mode=job.policy, batch=job.batch, accum=job.accum, checkpoint_timeout=job.checkpoint_timeout,
        kill_grace=job.kill_grace, startup_timeout=job.startup_timeout, hang_timeout=job.hang_timeout,
        backoff_initial=job.backoff_initial, backoff_max=job.backoff_max,
        max_attempts=job.max_attempts_without_progress, sdk=job.sdk, restart=job.restart,
    )


class JobPaths:
    """Where a job's checkpoints, worker logs, history and telemetry live."""

    def __init__(self, checkpoints: Path, logs: Path, history: Path | None, telemetry: Path | None = None) -> None:
        self.checkpoints = checkpoints
        self.logs = logs
        self.history = history
        self.telemetry = telemetry


class Job:
    """A configured job and whatever worker processes it has now."""

    def __init__(
        self, name: str, config: JobConfig, limits: Limits, paths: JobPaths, system: System, endpoint: str,
        send: SendToWorker, publish: Publish, orphan_timeout: float = 5.0, telemetry_max: int = 50 * 2**20,
        telemetry_keep: int = 3,
    ) -> None:
        self.name = name
        self.config = config
        self.paths = paths
        self.system = system
        self.endpoint = endpoint
        self.send_frame = send
        self.publish = publish
        self.orphan_timeout = orphan_timeout
        self.lifecycle = Lifecycle(settings_of(config), limits)
        self.procs: dict[int, WorkerProcess] = {}  # life -> process, current and departing
        self.token = ""
        self.identity: bytes | None = None
        self.next_config: JobConfig | None = None
        self.io_errors: dict[str, int] = {}
        self._io_logged: dict[str, float] = {}
        self.log = log.bind(job=name)
        self.history = History(paths.history, on_error=self.io_error)
        self.recorder = Recorder(paths.telemetry, on_error=self.io_error, max_bytes=telemetry_max,
                                 keep=telemetry_keep)

    # -- what the rest of the daemon reads ----------------------------------------------------------

    @property
    def state(self) -> JobState:
        return self.lifecycle.state

    @property
    def life(self) -> Life | None:
        return self.lifecycle.life

    @property
    def limits(self) -> Limits:
        return self.lifecycle.limits

    @property
    def stats(self) -> JobStats:
        return self.lifecycle.stats

    @property
    def batch(self) -> int:
        return self.lifecycle.batch

    @property
    def accum(self) -> int:
        return self.lifecycle.accum

    @property
    def last_sampled(self) -> int:
        return self.lifecycle.last_sampled

    @property
    def busy(self) -> bool:
        """A worker process of this job exists (current or departing), or is about to be spawned."""
        return self.lifecycle.busy or bool(self.procs)

    @property
    def pid(self) -> int | None:
        proc = self._current()
        return proc.pid if proc is not None else None

    def next_deadline(self) -> float:
        return self.lifecycle.next_deadline()

    # -- operator requests (Refused when the job cannot take them now) ------------------------------

    def start(self, now: float, reason: str = "start", client: str = "local") -> None:
        self.feed(ev.Start(now, reason, client))

    def stop(self, now: float, reason: str = "stop", client: str = "local") -> None:
        self.feed(ev.Stop(now, reason, client))

    def restart(self, now: float, client: str = "local") -> None:
        self.feed(ev.Restart(now, client))

    def shutdown(self, now: float, client: str = "local") -> None:
        self.feed(ev.Shutdown(now, client))

    def checkpoint(self, client: str = "local") -> None:
        self.feed(ev.CheckpointNow(client))

    def set_limits(self, limits: Limits, client: str = "local") -> None:
        self.feed(ev.SetLimits(limits, client))

    def signal(self, signum: int, client: str = "local") -> bool:
        proc = self._current()
        sent = proc is not None and proc.signal_group(signum)
        if sent:
            self.history_record("signal", signal=signal.Signals(signum).name, client=client)
        return sent

    def reconfigure(self, config: JobConfig, limits: Limits) -> None:
        """New settings from a reread config; they apply at the job's next start."""
        self.next_config = config
        self.lifecycle.reconfigure(settings_of(config), limits)
        self.history_record("config_changed", applies="next start")

    # -- inputs from the daemon ----------------------------------------------------------------------

    def accepts(self, token: str) -> bool:
        """True when ``token`` is the spawn token of this job's current worker."""
        return self._current() is not None and secrets.compare_digest(token, self.token)

    def on_hello(self, hello: Hello, identity: bytes, now: float) -> None:
        self.identity = identity
        self.feed(ev.HelloIn(now, hello))

    def on_message(self, message: Message, now: float) -> None:
        if isinstance(message, Step):
            self.feed(ev.StepIn(now, message))
        elif isinstance(message, Goodbye):
            self.feed(ev.GoodbyeIn(now, message.reason, message.step, self._newest()))
        else:
            if isinstance(message, CheckpointSaved):
                self.history_record("checkpoint", step=message.step, seconds=round(message.seconds, 4),
                                    bytes=message.nbytes)
                self.publish(self.name, "log", {"event": "checkpoint", "step": message.step})
            self.feed(ev.Heard(now))

    def on_sample(self, now: float, available: int, floor: int) -> None:
        """Sample the current worker's group and every departing worker, and act on the total."""
        proc = self._current()
        departing = {life: self.procs[life].sample(now).bytes for life in self.lifecycle.departing
                     if life in self.procs}
        if proc is None and not departing:
            return
        current, complete = None, True
        if proc is not None:
            sample = proc.sample(now)
            current, complete = sample.bytes, sample.complete
            if complete:
                self.recorder.record("sample", bytes=sample.bytes, pids=sample.pids,
                                     **({"departing": sum(departing.values())} if departing else {}))
        self.feed(ev.Sample(now, current, complete, departing, available, floor))

    def tick(self, now: float, available: int, resume_above: int) -> None:
        """Reap what exited, then let the lifecycle check its deadlines."""
        current = self.lifecycle.life.id if self.lifecycle.life is not None else None
        for life, proc in list(self.procs.items()):
            code = proc.poll()
            if code is None:
                continue
            del self.procs[life]
            if life == current:
                self.identity = None
                self.feed(ev.Exited(now, code, self._newest()))
            else:
                self.feed(ev.DepartedExited(now, life, code))
        self.feed(ev.Tick(now, available, resume_above))

    # -- carrying out the lifecycle's actions --------------------------------------------------------

    def feed(self, event: Event) -> None:
        """Hand one event to the lifecycle and carry out every action it returns."""
        for action in self.lifecycle.handle(event):
            self._carry_out(action)

    def _carry_out(self, action: Action) -> None:
        if isinstance(action, ev.Telemetry):
            self.recorder.record(action.kind, **action.fields)
            if action.publish:
                self.publish(self.name, "telemetry", action.fields)
        elif isinstance(action, ev.Send):
            if self.identity is not None:
                self.send_frame(self.identity, encode(Command(action.action, action.reason)))
        elif isinstance(action, ev.Signal):
            proc = self.procs.get(action.life)
            if proc is not None:
                proc.signal_group(action.signum)
        elif isinstance(action, ev.Spawn):
            self._spawn(action)
        elif isinstance(action, ev.Depart):
            self.identity = None  # its process stays in self.procs until reaped
        elif isinstance(action, ev.StateChanged):
            self.log.info("job_state", old=action.old, new=action.new, reason=action.reason, **action.fields)
            data = {"old": action.old, "new": action.new, "reason": action.reason, **action.fields}
            self.history_record("state", **data)
            self.publish(self.name, "state", data)
        elif isinstance(action, ev.Decided):
            self._decided(action)
        elif isinstance(action, ev.Note):
            getattr(self.log, action.level)(LOG_NAMES.get(action.event, action.event), **action.fields)
            if action.history:
                self.history_record(action.event, **action.fields)

    def _decided(self, action: ev.Decided) -> None:
        decision = action.decision
        fields = {"action": decision.action.value, "reason": decision.reason, **action.numbers}
        if decision.diagnosis is not None:
            fields["diagnosis"] = decision.diagnosis.value
            if decision.next_batch:
                fields.update(next_batch=decision.next_batch, next_accum=decision.next_accum)
        self.log.warning("decision", **fields)
        if decision.action is not Do.CLEAR_CACHE:
            self.history_record("decision", **fields)
        self.publish(self.name, "decision", fields)

    def _spawn(self, action: ev.Spawn) -> None:
        now = self.system.now()
        if self.next_config is not None and self.lifecycle.next is None:
            self.config, self.next_config = self.next_config, None  # the lifecycle has adopted it
        self.token = secrets.token_hex(16)
        self.identity = None
        env = self._worker_env(self.token, action.batch, action.accum)
        newest = self._newest()
        try:
            proc = self.system.spawn(worker_argv(self.config), env, self._cwd(), self.paths.logs)
        except OSError as exc:
            self.feed(ev.SpawnFailed(action.life, now, str(exc)))
            return
        self.procs[action.life] = proc
        self.feed(ev.Spawned(action.life, now, proc.pid, newest))

    def _current(self) -> WorkerProcess | None:
        life = self.lifecycle.life
        return self.procs.get(life.id) if life is not None else None

    def _newest(self) -> int:
        """Step of the newest checkpoint on disk; 0 when there is none or the directory cannot be read."""
        try:
            return latest_step(self.paths.checkpoints) or 0
        except OSError as exc:
            self.io_error("checkpoint_scan", exc)
            return 0

    def _worker_env(self, token: str, batch: int, accum: int) -> dict[str, str]:
        config = self.config
        env = {**os.environ, **config.env, "PYTHONUNBUFFERED": "1"}
        env.update({
            "MLXSUP_ENDPOINT": self.endpoint, "MLXSUP_TOKEN": token, "MLXSUP_JOB": self.name,
            "MLXSUP_CHECKPOINT_DIR": str(self.paths.checkpoints), "MLXSUP_BATCH": str(batch),
            "MLXSUP_ACCUM": str(accum), "MLXSUP_CHECKPOINT_EVERY": str(config.checkpoint_every),
            "MLXSUP_KEEP_CHECKPOINTS": str(config.keep_checkpoints),
            "MLXSUP_ORPHAN_TIMEOUT": str(self.orphan_timeout),
            "MLXSUP_CACHE_LIMIT": str(parse_fraction_of(config.cache_limit, self.limits.budget)),
            "MLXSUP_CACHE_CLEAR_BYTES": str(parse_bytes(config.cache_clear)),
        })
        return env

    def _cwd(self) -> Path | None:
        return Path(self.config.working_dir) if self.config.working_dir else None

    # -- files ---------------------------------------------------------------------------------------

    def history_record(self, kind: str, **fields: Any) -> None:
        self.history.record(kind, **fields)

    def io_error(self, kind: str, exc: OSError) -> None:
        """A failed write or scan: counted (status shows it) and logged at most once a minute per kind."""
        self.io_errors[kind] = self.io_errors.get(kind, 0) + 1
        now = time.monotonic()
        if now - self._io_logged.get(kind, -IO_ERROR_LOG_EVERY) >= IO_ERROR_LOG_EVERY:
            self._io_logged[kind] = now
            self.log.error("io_error", what=kind, error=str(exc), count=self.io_errors[kind])

