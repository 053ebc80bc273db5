"""The records the job lifecycle keeps: its settings, one worker life and its ranks, and its counters.

A life is one start of the job's workers: one process for a plain job, one process per local rank for a gang
(a data-parallel job whose ranks stop, checkpoint and restart together). Per-rank state (liveness, memory,
the policy's estimates) lives in ``Rank``; what the ranks share (batch, pending decision, deadlines) in
``Life``. A plain job's life has one rank, rank 0.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any

from protocol.messages import EXIT_CHECKPOINTED
from supervisor.core.guard import SampleTrend
from supervisor.core.policy import Decision, Estimator, PolicyConfig
from supervisor.core.recent import LAST_BATCHES, LAST_STOPS, Recent, Series

INF = math.inf


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the lifecycle needs of a job's config; times in seconds."""

    policy: PolicyConfig
    mode: str = "adaptive"  # adaptive | shrink-only | stop
    batch: int = 8
    accum: int = 1
    checkpoint_timeout: float = 30.0
    kill_grace: float = 3.0
    startup_timeout: float = 120.0
    hang_timeout: float = 60.0
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    max_attempts: int = 5
    clear_cache_every: float = 1.0  # seconds between clear-cache requests in the warn band
    departing_grace: float = 5.0  # a departing worker gets kill_grace + this to exit, then SIGKILL
    ranks: tuple[int, ...] = (0,)  # the ranks this daemon starts in every life
    world: int = 1  # ranks in the whole gang (on every host)
    peers: tuple[str, ...] = ()  # gang leader: the hosts whose daemons follow it
    follower: bool = False  # gang follower: lives start and end as the leader says
    peer_timeout: float = 3.0  # a peer not heard from for this long is not counted ready for a new generation
    sdk: bool | str = True  # False: a guard-only job (no hello, telemetry or checkpoints; enforcement by signals);
    # "auto": each life is guard-only until its worker says hello, an SDK life from then on
    restart: str = "on-breach"  # guard-only jobs: on-breach | never
    standby: str = "off"  # "auto": start the next worker early, as a standby (supervisor.core.standby)
    standby_estimate: int = 64 * 2**20  # bytes a standby is expected to hold until one has been sampled

    @property
    def gang(self) -> bool:
        """Several ranks that stop and restart together (no overlapped restart for them)."""
        return self.world > 1 or len(self.ranks) > 1


@dataclasses.dataclass
class Rank:
    """One rank's process in one life."""

    rank: int
    estimator: Estimator
    last_heard: float
    pid: int = 0
    hello: bool = False
    last_step: int = 0
    healthy_steps: int = 0
    over_count: int = 0
    last_cache_clear: float = -INF
    goodbye: str = ""
    goodbye_step: int | None = None  # the step it said goodbye at (checkpointed, for a gang stop)
    last_bytes: int = 0  # the group's last complete sample
    min_bytes: int = 0  # its smallest (0: none yet): what a fresh worker needs when there is no baseline yet
    exit_code: int | None = None
    growth: SampleTrend = dataclasses.field(default_factory=SampleTrend)  # a guard-only life's samples per second
    signalled: str = ""  # why the supervisor signalled it (its exit is then expected)
    waiting: str = ""  # the collective it said it is blocked in (cleared by its next step)
    waiting_since: float = INF

    @property
    def alive(self) -> bool:
        return self.exit_code is None


@dataclasses.dataclass
class Life:
    """One start of the job's workers, from spawn to the exit of its last rank."""

    id: int
    spawned_at: float
    batch: int
    accum: int
    ranks: dict[int, Rank]
    start_checkpoint: int = 0  # progress is a newer checkpoint than this
    pending: Decision | None = None  # why we asked it to exit (or killed it), applied when it has
    deadline: float = INF  # checkpoint deadline, then the SIGKILL time
    term_sent: bool = False
    first_exit: int | None = None  # exit status of the first rank to exit
    left: bool = False  # a rank (or, over several hosts, another host's ranks) has left
    crashed: bool = False  # a rank exited unasked (not 0 or 75) while others ran: a crash, whatever was pending
    straggle_at: float = INF  # a rank exited: the others must be gone by then (SIGKILL)
    killed: bool = False  # SIGKILL sent (guard-only jobs at the ceiling)
    tail: tuple[str, ...] = ()  # the last stderr lines of the first rank that exited uncleanly

    @property
    def lead(self) -> Rank:
        """The lowest rank: it reports loss, batch and throughput for the life."""
        return self.ranks[min(self.ranks)]

    @property
    def hello(self) -> bool:
        """Every rank proved its spawn token."""
        return all(r.hello for r in self.ranks.values())

    @property
    def pid(self) -> int:
        return self.lead.pid

    @property
    def last_step(self) -> int:
        return max(r.last_step for r in self.ranks.values())

    @property
    def estimator(self) -> Estimator:
        """The lead rank's estimates (status shows each rank's separately)."""
        return self.lead.estimator

    @property
    def alive(self) -> list[Rank]:
        return [r for r in self.ranks.values() if r.alive]

    def code(self) -> int:
        """The life's exit status once every rank has exited.

        The first rank to exit tells what happened: 75 (the gang checkpointed at one step and left together, and
        a straggler killed afterwards changes nothing), 0 (finished, when every rank finished), or a crash.
        """
        first = self.first_exit if self.first_exit is not None else 0
        if first == EXIT_CHECKPOINTED:
            return first
        codes = [r.exit_code or 0 for r in self.ranks.values()]
        if first == 0:
            return next((c for c in codes if c != 0), 0)
        return first


@dataclasses.dataclass
class Departing:
    """A worker that checkpointed on request and said goodbye, not yet reaped."""

    kill_at: float
    bytes: int = 0
    killed: bool = False
    pid: int = 0


@dataclasses.dataclass
class JobStats:
    """Counters for status, summaries and benchmarks; each list is bounded (``supervisor.core.recent``)."""

    target_steps: int = 0
    steps_completed: int = 0
    restarts: int = 0
    restart_reasons: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    first_breach_step: int | None = None
    max_sampled: int = 0
    samples: int = 0
    samples_over_budget: int = 0
    samples_over_kill: int = 0
    # [step, batch, accum] at the start and at each change since: the last LAST_BATCHES (total: all of them).
    batch_history: Recent[list[int]] = dataclasses.field(default_factory=lambda: Recent(LAST_BATCHES))
    final_loss: float | None = None
    # Seconds from a breach decision to the next life's first step: the recent ones, and their count and max.
    recoveries: Series = dataclasses.field(default_factory=Series)
    last_decision_at: float | None = None
    steps_per_second: float = 0.0
    rank_max_sampled: dict[int, int] = dataclasses.field(default_factory=dict)  # rank -> its largest sample
    # For each checkpoint-and-exit of a gang: the step each rank checkpointed at.
    stop_steps: Recent[list[int]] = dataclasses.field(default_factory=lambda: Recent(LAST_STOPS))
    # The last crash: {"exit_code", "signal", "stderr_tail", "signature"} (supervisor.core.crashes.Crash.record)
    last_error: dict[str, Any] | None = None
    standbys: int = 0  # standbys started
    standbys_used: int = 0  # lives that began as a standby's go
    standby_max_bytes: int = 0  # the largest sample of a standby's group
