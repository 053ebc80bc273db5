"""What goes into the job lifecycle (events) and what comes out of it (actions), as plain frozen data.

Events carry everything the lifecycle must know from the outside world, including the results of I/O (the
newest checkpoint on disk, a footprint sample, the exit status), so the lifecycle itself never reads a clock,
a file or a process. Actions are what the job must carry out; ``Spawn`` is answered with ``Spawned`` or
``SpawnFailed``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from protocol import Hello, Step
from protocol.messages import Steps
from supervisor.core.gang import Outcome
from supervisor.core.policy import Decision, Limits

# -- events: operator ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Start:
    """Start a worker now (operator, autostart, resume after a daemon restart)."""

    now: float
    reason: str = "start"
    client: str = "local"


@dataclasses.dataclass(frozen=True, slots=True)
class Stop:
    """Checkpoint and stop; cancels a pending restart."""

    now: float
    reason: str = "stop"
    client: str = "local"


@dataclasses.dataclass(frozen=True, slots=True)
class Restart:
    """Checkpoint and stop, then start again once the worker has exited."""

    now: float
    client: str = "local"


@dataclasses.dataclass(frozen=True, slots=True)
class Shutdown:
    """The daemon is stopping: stop for good (no restart, no start) and let the worker checkpoint."""

    now: float
    client: str = "local"  # who asked: a signal is local; `shutdown` names its client


@dataclasses.dataclass(frozen=True, slots=True)
class CheckpointNow:
    """Ask the worker for a checkpoint at its next step boundary."""

    client: str = "local"


@dataclasses.dataclass(frozen=True, slots=True)
class SetLimits:
    """A new budget, live: it applies to the next sample."""

    limits: Limits
    client: str = "local"


# -- events: the worker and the OS -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Spawned:
    """Rank ``rank`` of life ``life`` is running; ``start_checkpoint`` is the newest checkpoint on disk."""

    life: int
    now: float
    pid: int
    start_checkpoint: int
    rank: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class SpawnFailed:
    life: int
    now: float
    error: str


@dataclasses.dataclass(frozen=True, slots=True)
class HelloIn:
    """A rank of the current life proved its spawn token (checked by the job) and says where it resumed."""

    now: float
    msg: Hello
    rank: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class StepIn:
    """Telemetry of one optimizer step of the current worker."""

    now: float
    msg: Step
    rank: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class StepsIn:
    """Telemetry of several held steps of the current worker, in one frame (rows in the order they ran)."""

    now: float
    msg: Steps
    rank: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class Heard:
    """Any other message from a rank of the current life (heartbeat, checkpoint_saved): it is alive."""

    now: float
    rank: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class GoodbyeIn:
    """The current worker is leaving on its own terms; ``newest`` is the newest checkpoint on disk now."""

    now: float
    reason: str
    step: int
    newest: int
    rank: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class Sample:
    """One footprint sample: rank ``rank``'s group in the current life (None when there is none) and every
    departing worker still unreaped (life -> bytes). ``complete`` is False when a process of the current group
    could not be read: its bytes under-count. Each rank of a gang is sampled against the budget on its own."""

    now: float
    current: int | None
    complete: bool
    departing: dict[int, int]
    available: int
    floor: int
    rank: int = 0
    standby: int | None = None  # the standby's group, when the job has one (its bytes count in the job's total)


@dataclasses.dataclass(frozen=True, slots=True)
class Waiting:
    """Rank ``rank`` says it has been blocked inside collective ``what`` for ``seconds``: no sign of life (it makes
    no progress), only what a gang hang's report names."""

    now: float
    rank: int
    what: str
    seconds: float


@dataclasses.dataclass(frozen=True, slots=True)
class Exited:
    """Rank ``rank`` of the current life exited (its group leader was reaped); ``newest`` is the newest
    checkpoint on disk; ``stderr_tail`` what it last wrote to stderr (read by the job for an unclean exit)."""

    now: float
    code: int
    newest: int
    rank: int = 0
    stderr_tail: tuple[str, ...] = ()  # the last lines of its stderr when it exited other than 0 or 75


@dataclasses.dataclass(frozen=True, slots=True)
class DepartedExited:
    """A departing worker (said goodbye, successor already planned) was reaped."""

    now: float
    life: int
    code: int


@dataclasses.dataclass(frozen=True, slots=True)
class Tick:
    """Time passed: deadlines, backoff and waiting for memory are checked."""

    now: float
    available: int
    resume_above: int


# -- events: a standby (the next worker, started early; see supervisor.core.standby) ---------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class StandbySpawned:
    """The standby of life ``life`` is running (its own process group)."""

    life: int
    now: float
    pid: int


@dataclasses.dataclass(frozen=True, slots=True)
class StandbySpawnFailed:
    life: int
    now: float
    error: str


@dataclasses.dataclass(frozen=True, slots=True)
class StandbyIn:
    """The standby of life ``life`` proved its token (checked by the job) with a ``standby`` message: it waits."""

    life: int
    now: float


@dataclasses.dataclass(frozen=True, slots=True)
class StandbyHeard:
    """A heartbeat from the standby of life ``life``: it is alive."""

    life: int
    now: float


@dataclasses.dataclass(frozen=True, slots=True)
class StandbyFailed:
    """The standby of life ``life`` broke the protocol (e.g. a hello before its go): dismiss it."""

    life: int
    now: float
    why: str


@dataclasses.dataclass(frozen=True, slots=True)
class StandbyExited:
    """The standby of life ``life`` was reaped before it became the job's worker."""

    life: int
    now: float
    code: int


# -- events: the other daemons of a gang over several hosts (see supervisor.core.gang) ----------------------


@dataclasses.dataclass(frozen=True, slots=True)
class PeerSync:
    """Leader: a follower's state (its request); answered with a ``Reply``."""

    now: float
    host: str
    gen: int  # the newest generation it started or skipped
    alive: int  # its ranks still running
    want: bool  # its operator wants the job to run
    outcome: Outcome | None  # how its ranks of ``gen`` ended
    newest: int  # the newest checkpoint on the leader's disk
    ranks: tuple[dict[str, Any], ...] = ()  # its ranks as status shows them
    leaving: bool = False  # its daemon is shutting down: this is its last report


@dataclasses.dataclass(frozen=True, slots=True)
class LeaderSays:
    """Follower: the leader's state (its reply). ``run``: generation ``gen`` is open, join it if not yet;
    otherwise ``end`` is the leader's final state when it has one (STOPPED, FINISHED, FATAL)."""

    now: float
    epoch: str  # the leader daemon's start: generations of an earlier leader process are different ones
    gen: int
    run: bool
    batch: int
    accum: int
    end: str = ""
    reason: str = ""


Event = (Start | Stop | Restart | Shutdown | CheckpointNow | SetLimits | Spawned | SpawnFailed | HelloIn | StepIn
         | StepsIn | Heard | Waiting | GoodbyeIn | Sample | Exited | DepartedExited | Tick | PeerSync | LeaderSays
         | StandbySpawned | StandbySpawnFailed | StandbyIn | StandbyHeard | StandbyFailed | StandbyExited)


# -- actions ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Spawn:
    """Start the workers of life ``life`` (one per rank of ``Settings.ranks``) at this batch x accumulation,
    then report Spawned (per rank) or SpawnFailed."""

    life: int
    batch: int
    accum: int


@dataclasses.dataclass(frozen=True, slots=True)
class Send:
    """A command to the current life's ranks (``protocol.Command`` action and reason); ``rank``: one only."""

    action: str
    reason: str
    rank: int | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Signal:
    """Signal the process group of every live rank of life ``life`` (``rank``: one only)."""

    life: int
    signum: int
    rank: int | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class SpawnStandby:
    """Start the standby that may become life ``life``, at this batch x accumulation (its own token, and
    ``MLXSUP_STANDBY=1``); then report StandbySpawned or StandbySpawnFailed. Its process is killed with
    ``Signal(life, SIGKILL)`` like any worker's."""

    life: int
    batch: int
    accum: int


@dataclasses.dataclass(frozen=True, slots=True)
class Go:
    """The waiting standby becomes life ``life``, the job's worker: send it ``go`` (this batch x accumulation and
    the newest checkpoint), make its token the current one, then report Spawned as for a spawn."""

    life: int
    batch: int
    accum: int


@dataclasses.dataclass(frozen=True, slots=True)
class Depart:
    """The current worker said goodbye after a requested checkpoint: keep its process as departing."""

    life: int


# Keys the daemon log (structlog) and the history file write themselves: a field of that name would shadow them
# (a decision's ``level`` once replaced the log line's level with a byte count).
RESERVED_KEYS = frozenset({"level", "event", "timestamp", "time"})


def check_fields(what: str, fields: dict[str, Any]) -> None:
    """ValueError when ``fields`` would shadow a key of the log line or history record they become."""
    clash = RESERVED_KEYS.intersection(fields)
    if clash:
        raise ValueError(f"{what}: field(s) {sorted(clash)} shadow the log's own keys; name them for what they are")


@dataclasses.dataclass(frozen=True, slots=True)
class StateChanged:
    old: str
    new: str
    reason: str
    fields: dict[str, Any]

    def __post_init__(self) -> None:
        check_fields(f"state {self.new}", self.fields)


@dataclasses.dataclass(frozen=True, slots=True)
class Decided:
    """A policy decision, with the numbers behind it (logged, recorded, published)."""

    decision: Decision
    numbers: dict[str, Any]

    def __post_init__(self) -> None:
        check_fields(f"decision {self.decision.action.value}", self.numbers)


@dataclasses.dataclass(frozen=True, slots=True)
class Note:
    """Something worth a log line and a history record (``history=False``: the log only)."""

    event: str
    fields: dict[str, Any]
    level: str = "info"
    history: bool = True

    def __post_init__(self) -> None:
        check_fields(self.event, self.fields)


@dataclasses.dataclass(frozen=True, slots=True)
class Telemetry:
    """One record for the telemetry file and the event stream (``kind``: step or sample)."""

    kind: str
    fields: dict[str, Any]
    publish: bool = True


@dataclasses.dataclass(frozen=True, slots=True)
class Reply:
    """Leader: the answer to a follower's ``PeerSync``."""

    host: str
    fields: dict[str, Any]


Action = Spawn | Send | Signal | Depart | StateChanged | Decided | Note | Telemetry | Reply | SpawnStandby | Go


class Refused(Exception):
    """An operator request the job cannot take in its current state; the message says why."""
