"""One supervised job: its lifecycle's actions carried out on processes, sockets and files.

Decisions are made by ``supervisor.core.lifecycle.Lifecycle``; the Job turns what happens (worker messages,
footprint samples, exits, operator requests, time) into events for it, and carries out the actions it returns:
spawn, command the worker, signal a process group, log, record and publish. OS effects go through
``supervisor.daemon.system``. A write that fails (full or read-only state directory) is counted and logged,
never raised: the daemon keeps supervising and enforcing budgets.

A gang job (``supervisor.hostfile.Layout``) runs one process per local rank in each life, each with its own
process group, spawn token, worker socket identity, log directory and footprint samples; a plain job is the
case of one rank, rank 0.
"""

from __future__ import annotations

import math
import secrets
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from protocol import Census, CheckpointSaved, Command, Goodbye, Heartbeat, Hello, Message, Step, encode
from protocol.checkpoints import latest_step
from protocol.messages import EXIT_CHECKPOINTED, MAX_STEPS_ROWS, Steps
from supervisor.backends import Backend
from supervisor.config import JobConfig
from supervisor.core import events as ev
from supervisor.core.diagnosis import JobDiagnosis
from supervisor.core.events import Action, Event, Refused
from supervisor.core.gang import Outcome
from supervisor.core.lifecycle import JobStats, Life, Lifecycle, Settings
from supervisor.core.policy import Action as Do
from supervisor.core.policy import Limits, PolicyConfig, hold_horizon, hold_threshold, sample_gap
from supervisor.core.sizes import parse_bytes
from supervisor.core.states import JobState
from supervisor.daemon import backends, leaks, spawning
from supervisor.daemon import standby as standby_link
from supervisor.daemon.exits import PendingExits
from supervisor.daemon.history import History
from supervisor.daemon.ranks import rank_rows
from supervisor.daemon.recorder import Recorder, expand_steps
from supervisor.daemon.system import System, WorkerProcess
from supervisor.daemon.tails import stderr_tail
from supervisor.hostfile import Layout

Publish = Callable[[str, str, dict[str, Any]], None]  # (job, kind, data)
Wants = Callable[[str, str], bool]  # (job, kind): whether an event of that kind has a subscriber
SendToWorker = Callable[[bytes, bytes], None]  # (identity, frame)
log = structlog.get_logger("mlxsupd")
IO_ERROR_LOG_EVERY = 60.0  # seconds between log lines about the same kind of failing write
# Log event names that differ from the history's (scripts and the fault campaign read the log by these).
LOG_NAMES = {"hello": "worker_hello", "exit": "worker_exit", "budget": "budget_changed"}
__all__ = ["Job", "JobPaths", "Refused", "settings_of"]
ProcKey = tuple[int, int]  # (life, rank)


def settings_of(job: JobConfig, layout: Layout | None = None) -> Settings:
    """The lifecycle settings of a job's config."""
    policy = PolicyConfig(
        leak_threshold=float(parse_bytes(job.leak_threshold)), leak_rate=float(parse_bytes(job.leak_rate)),
        shrink_factor=job.shrink_factor,
        min_batch=job.min_batch, max_batch=job.batch, keep_effective_batch=job.keep_effective_batch,
        min_steps_per_life=job.min_steps_per_life, regrow_after_steps=job.regrow_after_steps,
        adaptive=job.policy == "adaptive",
    )
    return Settings(
        policy=policy, mode=job.policy, batch=job.batch, accum=job.accum, checkpoint_timeout=job.checkpoint_timeout,
        kill_grace=job.kill_grace, startup_timeout=job.startup_timeout, hang_timeout=job.hang_timeout,
        backoff_initial=job.backoff_initial, backoff_max=job.backoff_max,
        max_attempts=job.max_attempts_without_progress, sdk=job.sdk, restart=job.restart, standby=job.standby,
        ranks=layout.local_ranks if layout else (0,), world=layout.world if layout else 1,
        peers=layout.peers if layout else (), follower=bool(layout and not layout.leader),
    )


Cadence = tuple[float, float, float]  # (sample interval s, longest gap s, growth rate bytes/s)


class JobPaths:
    """Where a job's checkpoints, worker logs, history and telemetry live."""

    def __init__(self, checkpoints: Path, logs: Path, history: Path | None, telemetry: Path | None = None,
                 ring: Path | None = None) -> None:
        self.checkpoints = checkpoints
        self.logs = logs
        self.history = history
        self.telemetry = telemetry
        self.ring = ring  # a gang's MLX_HOSTFILE (rewritten for every generation)


class Job:
    """A configured job and whatever worker processes it has now."""

    def __init__(
        self, name: str, config: JobConfig, limits: Limits, paths: JobPaths, system: System, endpoint: str,
        send: SendToWorker, publish: Publish, orphan_timeout: float = 5.0, telemetry_max: int = 50 * 2**20,
        telemetry_keep: int = 3, layout: Layout | None = None, wants: Wants = lambda job, kind: True,
    ) -> None:
        self.name = name
        self.config = config
        self.layout = layout
        self.paths = paths
        self.system = system
        self.endpoint = endpoint
        self.send_frame = send
        self.publish = publish
        self.wants = wants  # whether anyone subscribed to a kind of this job's events
        self.orphan_timeout = orphan_timeout
        self.lifecycle = Lifecycle(settings_of(config, layout), limits)
        self.procs: dict[ProcKey, WorkerProcess] = {}  # (life, rank) -> process, current and departing
        self.exits = PendingExits()  # reaped processes whose exit waits for their last frames
        self.tokens: dict[int, str] = {}  # rank -> spawn token of the current life
        self.standby_link: standby_link.Link | None = None  # the standby's token and socket, until its go
        self.identities: dict[int, bytes] = {}  # rank -> worker socket identity, once it said hello
        self.features: dict[int, frozenset[str]] = {}  # rank -> the optional features its hello announced
        self.diagnosis = JobDiagnosis(float(parse_bytes(config.leak_threshold)), config.diagnose_on_leak)
        self.protocols: dict[int, int] = {}  # rank -> protocol version negotiated in its welcome
        self.stderr_start: dict[int, int] = {}  # rank -> size of its stderr.log when the current life began
        self.next_config: JobConfig | None = None
        self.next_layout: Layout | None = layout
        self.replies: dict[str, dict[str, Any]] = {}  # gang leader: the last answer to each follower
        self.leader_heard: float | None = None  # gang follower: when the leader last answered
        self.last_decision: dict[int, str] = {}  # rank -> the reason of its last decision (status shows it)
        self.io_errors: dict[str, int] = {}
        self.backend: tuple[JobConfig, Backend] | None = None  # a gang's backend, resolved from this config
        self.rendezvous: dict[int, backends.Rendezvous] = {}  # life -> its MPI rendezvous (backend = "mpi")
        self._io_logged: dict[str, float] = {}
        self.log = log.bind(job=name)
        self.history = History(paths.history, on_error=self.io_error, max_bytes=telemetry_max, keep=telemetry_keep)
        self.recorder = Recorder(paths.telemetry, on_error=self.io_error, max_bytes=telemetry_max,
                                 keep=telemetry_keep)
        self.sampled_at = 0.0  # when its workers were last sampled (0: never; finite, for the poll timeout)
        self.next_sample_at = 0.0  # when they are next, while it runs steadily (see next_sample)
        self._sampled_all = False  # the last sample read every member of every group

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
        return self.lifecycle.busy or bool(self.procs) or bool(self.exits)

    @property
    def pid(self) -> int | None:
        proc = self._current().get(self._lead())
        return proc.pid if proc is not None else None

    @property
    def token(self) -> str:
        """The spawn token of the lowest rank of the current life (a plain job's one worker)."""
        return self.tokens.get(self._lead(), "")

    def current_pids(self) -> set[int]:
        """Pids of the current life's workers (not of departing ones)."""
        return {proc.pid for proc in self._current().values()}

    def rank_of(self, identity: bytes) -> int | None:
        """The rank of the current life whose worker uses this socket identity."""
        return next((rank for rank, known in self.identities.items() if known == identity), None)

    def next_deadline(self) -> float:
        return min(self.lifecycle.next_deadline(), self.exits.deadline())

    def rank_rows(self) -> list[dict[str, Any]]:
        """This daemon's ranks as status and top show them (see ``supervisor.daemon.ranks``)."""
        return rank_rows(self)

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

    def signal(self, signum: int, client: str = "local", rank: int | None = None) -> bool:
        """Signal the current life's process groups (every rank, or one)."""
        sent = False
        for proc_rank, proc in self._current().items():
            if rank is None or rank == proc_rank:
                sent = proc.signal_group(signum) or sent
        if sent:
            fields = {"rank": rank} if rank is not None else {}
            self.history_record("signal", signal=signal.Signals(signum).name, client=client, **fields)
        return sent

    def reconfigure(self, config: JobConfig, limits: Limits, layout: Layout | None = None) -> None:
        """New settings from a reread config; they apply at the job's next start."""
        self.next_config = config
        self.next_layout = layout
        self.lifecycle.reconfigure(settings_of(config, layout), limits)
        self.history_record("config_changed", applies="next start")

    def on_peer_sync(self, now: float, host: str, gen: int, alive: int, want: bool, outcome: Outcome | None,
                     ranks: tuple[dict[str, Any], ...], leaving: bool = False) -> dict[str, Any]:
        """Gang leader: a follower's state arrived (``leaving``: its last, its daemon shuts down); returns the
        answer for it."""
        self.feed(ev.PeerSync(now, host, gen, alive, want, outcome, self.newest_step(), ranks, leaving))
        return self.replies.pop(host, {"error": "no answer"})

    # -- inputs from the daemon ----------------------------------------------------------------------

    def accepts(self, token: str) -> bool:
        """True when ``token`` is the spawn token of one of this job's current workers."""
        return self._token_rank(token) is not None

    def _token_rank(self, token: str) -> int | None:
        current = self._current()
        return next((rank for rank, known in self.tokens.items()
                     if rank in current and secrets.compare_digest(token, known)), None)

    def heard_before_hello(self, token: str, now: float) -> None:
        """A heartbeat with a current spawn token from a worker that has not said hello yet (loading a model)."""
        rank = self._token_rank(token)
        if rank is not None:
            self.feed(ev.Heard(now, rank))

    def on_hello(self, hello: Hello, identity: bytes, now: float, version: int = 1) -> None:
        rank = self._token_rank(hello.token)
        if rank is None:
            return
        self.identities[rank] = identity
        self.features[rank] = frozenset((hello.features or "").split())
        self.protocols[rank] = version
        self.feed(ev.HelloIn(now, hello, rank))

    def on_message(self, message: Message, now: float, rank: int | None = None) -> None:
        """A message from the worker of rank ``rank`` of the current life (default: the lowest rank's); the loop
        finds the rank with ``rank_of``."""
        rank = self._lead() if rank is None else rank
        if isinstance(message, Step):
            leaks.observe(self, message, now, rank)
            self.feed(ev.StepIn(now, message, rank))
        elif isinstance(message, Steps):
            leaks.observe(self, message, now, rank)
            self.feed(ev.StepsIn(now, message, rank))
        elif isinstance(message, Census):
            leaks.census_in(self, message)
            self.feed(ev.Heard(now, rank))
        elif isinstance(message, Goodbye):
            self.feed(ev.GoodbyeIn(now, message.reason, message.step, self.newest_step(), rank))
        elif isinstance(message, Heartbeat) and message.waiting and self.layout is not None:
            self.feed(ev.Waiting(now, rank, message.waiting[:64], max(0.0, message.waiting_seconds or 0.0)))
        else:
            if isinstance(message, CheckpointSaved):
                fields = {"rank": rank} if self.layout is not None else {}
                self.history_record("checkpoint", step=message.step, seconds=round(message.seconds, 4),
                                    bytes=message.nbytes, **fields)
                self.publish(self.name, "log", {"event": "checkpoint", "step": message.step, **fields})
            self.feed(ev.Heard(now, rank))

    def protocol_of(self, rank: int) -> int:
        """The protocol version negotiated with the worker of ``rank`` (1 before its hello)."""
        return self.protocols.get(rank, 1)

    def heartbeat(self, sent_at: float, hold: float) -> Heartbeat:
        """The heartbeat for this job's worker, with how long (at most ``hold`` seconds, and a quarter of the
        hang timeout) and how far from its bands it may hold step telemetry, and that held steps may come as
        ``steps`` frames: see ``worker.hold``."""
        life = self.lifecycle.life
        hold = min(hold, self.lifecycle.settings.hang_timeout / 4)
        if self.layout is not None:  # a gang's ranks meet at every step: nothing is held
            return Heartbeat(sent_at, report_waiting=1)  # a rank blocked in a collective may say so
        if hold <= 0 or life is None or not life.estimator.levels:
            return Heartbeat(sent_at)  # nothing to compare the group's footprint with yet: no holding
        below = hold_threshold(self.limits, self.last_sampled, life.estimator.level)
        return Heartbeat(sent_at, None, hold, below, hold_horizon(life.estimator), MAX_STEPS_ROWS)

    def next_sample(self, interval: float) -> float:
        """When this job's workers are next sampled (inf without a process): on the cadence ``on_sample`` set
        while the job runs steadily far from its budget and its last sample was complete, else ``interval``
        after the last sample."""
        if not self.procs:
            return math.inf
        if self._sampled_all and self.lifecycle.headroom():
            return self.next_sample_at
        return self.sampled_at + interval

    def on_sample(self, now: float, available: int, floor: int, cadence: Cadence = (0.0, 0.0, 0.0)) -> None:
        """Sample each current worker's group and every departing worker, and act on the totals; then set
        when the next sample is due, by ``cadence`` (interval, longest gap, growth rate: see ``sample_gap``)."""
        self._sample(now, available, floor)
        interval, longest, growth = cadence
        gap = sample_gap(self.lifecycle.headroom(), interval, longest, growth)
        base = self.next_sample_at if self.next_sample_at > now - gap else now  # keep the grid unless behind
        self.sampled_at, self.next_sample_at = now, base + gap

    def _sample(self, now: float, available: int, floor: int) -> None:
        current = self._current()
        departing = {key[0]: proc.sample(now).bytes for key, proc in self.procs.items()
                     if key[0] in self.lifecycle.departing}
        standby = standby_link.sample(self, now)
        self._sampled_all = False
        if not current and not departing and standby is None:
            return
        if not current:
            self.feed(ev.Sample(now, None, True, departing, available, floor, standby=standby))
            return
        self._sampled_all = True
        for rank, proc in current.items():
            sample = proc.sample(now)
            self._sampled_all &= sample.complete
            if sample.complete:
                leaks.sample(self, now, sample.bytes)
                fields = {"rank": rank} if self.layout is not None else {}
                self.recorder.record("sample", bytes=sample.bytes, pids=sample.pids, **fields,
                                     **({"departing": sum(departing.values())} if departing else {}),
                                     **({"standby": standby} if standby is not None else {}))
            self.feed(ev.Sample(now, sample.bytes, sample.complete, departing, available, floor, rank, standby))

    def tick(self, now: float, available: int, resume_above: int) -> None:
        """Reap what exited (an exit that waits for its worker's last frames: see ``supervisor.daemon.exits``),
        then let the lifecycle check its deadlines."""
        exited = []
        for key, proc in list(self.procs.items()):
            code = proc.poll()
            if code is not None:
                del self.procs[key]
                standby_link.forget(self, key[0])
                exited.append((key, code))
        # Ranks reaped in one turn: one killed by a signal goes first, since a peer's "connection to a peer was
        # lost" exit is its fall-out (the first exit of a life is read as its cause).
        for key, code in sorted(exited, key=lambda item: item[1] >= 0):
            if self._awaits_frames(key, code):
                self.exits.hold(key, code, now)
            else:
                self._exited(key, code, now)
        for key, code, heard in self.exits.due(now, self._awaits_frames):
            if not heard:
                self.log.info("worker_exit_unheard", life=key[0], rank=key[1], code=code, waited=self.exits.grace)
            self._exited(key, code, now)
        if self.rendezvous:
            backends.tidy(self, now)
        self.feed(ev.Tick(now, available, resume_above))

    def _awaits_frames(self, key: ProcKey, code: int) -> bool:
        """Whether the exit of ``key`` waits: a current SDK worker (it said hello) that exited cleanly and whose
        goodbye has not been read yet (it sends it last, after its held steps and its checkpoint)."""
        life = self.lifecycle.life
        if code not in (0, EXIT_CHECKPOINTED) or life is None or life.id != key[0] or key[1] not in self.identities:
            return False
        rank = life.ranks.get(key[1])
        return rank is not None and not rank.goodbye

    def _exited(self, key: ProcKey, code: int, now: float) -> None:
        life, rank = key
        current = self.lifecycle.life
        if current is not None and life == current.id:
            self.identities.pop(rank, None)
            self.protocols.pop(rank, None)
            tail = () if code in (0, EXIT_CHECKPOINTED) else stderr_tail(self.stderr_path(rank),
                                                                         self.stderr_start.get(rank, 0))
            self.feed(ev.Exited(now, code, self.newest_step(), rank, tail))
        elif life in self.lifecycle.departing:
            self.feed(ev.DepartedExited(now, life, code))
        else:
            standby_link.exited(self, life, code, now)

    # -- carrying out the lifecycle's actions --------------------------------------------------------

    def feed(self, event: Event) -> None:
        """Hand one event to the lifecycle and carry out every action it returns."""
        for action in self.lifecycle.handle(event):
            self._carry_out(action)

    def _carry_out(self, action: Action) -> None:
        if isinstance(action, ev.Telemetry):
            self.recorder.record(action.kind, **action.fields)
            if action.kind == "steps":  # one event per step, however they came; built only for a subscriber
                events = expand_steps(action.fields) if action.publish and self.wants(self.name, "telemetry") else []
            else:
                events = [action.fields] if action.publish else []
            for fields in events:
                self.publish(self.name, "telemetry", fields)
        elif isinstance(action, ev.Send):
            if action.action == Command.CLEAR_CACHE:
                leaks.clear_asked(self, self.system.now())
            command = Command(action.action, action.reason)
            for rank, identity in list(self.identities.items()):
                if action.rank is None or action.rank == rank:
                    self.send_frame(identity, encode(command, self.protocol_of(rank)))
        elif isinstance(action, ev.Signal):
            for (life, rank), proc in list(self.procs.items()):
                if life == action.life and action.rank in (None, rank):
                    proc.signal_group(action.signum)
        elif isinstance(action, ev.Spawn):
            spawning.spawn_life(self, action)
        elif isinstance(action, ev.SpawnStandby | ev.Go):
            standby_link.carry_out(self, action)
        elif isinstance(action, ev.Depart):
            self.identities.clear()  # its process stays in self.procs until reaped
            self.protocols.clear()
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
            if action.event == "exit":
                leaks.life_ended(self)
        elif isinstance(action, ev.Reply):
            self.replies[action.host] = action.fields

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
            self.last_decision[fields.get("rank", 0)] = decision.reason
        self.publish(self.name, "decision", fields)

    def _current(self) -> dict[int, WorkerProcess]:
        """rank -> process of the current life."""
        life = self.lifecycle.life
        if life is None:
            return {}
        return {rank: proc for (life_id, rank), proc in self.procs.items() if life_id == life.id}

    def _lead(self) -> int:
        return min(self.lifecycle.settings.ranks)

    def newest_step(self) -> int:
        """Step of the newest checkpoint on disk; 0 when there is none or the directory cannot be read."""
        try:
            return latest_step(self.paths.checkpoints) or 0
        except OSError as exc:
            self.io_error("checkpoint_scan", exc)
            return 0

    def log_dir(self, rank: int) -> Path:
        """Where a rank's worker logs go: ``rank-N/`` under the job's logs for a gang."""
        return self.paths.logs / f"rank-{rank}" if self.layout is not None else self.paths.logs

    def stderr_path(self, rank: int) -> Path:
        return self.log_dir(rank) / "stderr.log"

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
