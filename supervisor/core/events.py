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
    """The worker of life ``life`` is running; ``start_checkpoint`` is the newest checkpoint on disk."""

    life: int
    now: float
    pid: int
    start_checkpoint: int


@dataclasses.dataclass(frozen=True, slots=True)
class SpawnFailed:
    life: int
    now: float
    error: str


@dataclasses.dataclass(frozen=True, slots=True)
class HelloIn:
    """The current worker proved its spawn token (checked by the job) and says where it resumed."""

    now: float
    msg: Hello


@dataclasses.dataclass(frozen=True, slots=True)
class StepIn:
    """Telemetry of one optimizer step of the current worker."""

    now: float
    msg: Step


@dataclasses.dataclass(frozen=True, slots=True)
class Heard:
    """Any other message from the current worker (heartbeat, checkpoint_saved): it is alive."""

    now: float


@dataclasses.dataclass(frozen=True, slots=True)
class GoodbyeIn:
    """The current worker is leaving on its own terms; ``newest`` is the newest checkpoint on disk now."""

    now: float
    reason: str
    step: int
    newest: int


@dataclasses.dataclass(frozen=True, slots=True)
class Sample:
    """One footprint sample: the current worker's group (None when there is none) and every departing worker
    still unreaped (life -> bytes). ``complete`` is False when a process of the current group could not be
    read: its bytes under-count."""

    now: float
    current: int | None
    complete: bool
    departing: dict[int, int]
    available: int
    floor: int


@dataclasses.dataclass(frozen=True, slots=True)
class Exited:
    """The current worker's leader exited and was reaped; ``newest`` is the newest checkpoint on disk."""

    now: float
    code: int
    newest: int


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


Event = (Start | Stop | Restart | Shutdown | CheckpointNow | SetLimits | Spawned | SpawnFailed | HelloIn | StepIn
         | Heard | GoodbyeIn | Sample | Exited | DepartedExited | Tick)


# -- actions ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Spawn:
    """Start a worker for life ``life`` at this batch x accumulation, then report Spawned or SpawnFailed."""

    life: int
    batch: int
    accum: int


@dataclasses.dataclass(frozen=True, slots=True)
class Send:
    """A command to the current worker (``protocol.Command`` action and reason)."""

    action: str
    reason: str


@dataclasses.dataclass(frozen=True, slots=True)
class Signal:
    """Signal the process group of life ``life``."""

    life: int
    signum: int


@dataclasses.dataclass(frozen=True, slots=True)
class Depart:
    """The current worker said goodbye after a requested checkpoint: keep its process as departing."""

    life: int


@dataclasses.dataclass(frozen=True, slots=True)
class StateChanged:
    old: str
    new: str
    reason: str
    fields: dict[str, Any]


@dataclasses.dataclass(frozen=True, slots=True)
class Decided:
    """A policy decision, with the numbers behind it (logged, recorded, published)."""

    decision: Decision
    numbers: dict[str, Any]


@dataclasses.dataclass(frozen=True, slots=True)
class Note:
    """Something worth a log line and a history record (``history=False``: the log only)."""

    event: str
    fields: dict[str, Any]
    level: str = "info"
    history: bool = True


@dataclasses.dataclass(frozen=True, slots=True)
class Telemetry:
    """One record for the telemetry file and the event stream (``kind``: step or sample)."""

    kind: str
    fields: dict[str, Any]
    publish: bool = True


Action = Spawn | Send | Signal | Depart | StateChanged | Decided | Note | Telemetry


class Refused(Exception):
    """An operator request the job cannot take in its current state; the message says why."""
