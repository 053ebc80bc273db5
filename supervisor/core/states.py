"""Job states: integer codes with gaps, named groups, and the table of allowed transitions.

Imports nothing from the project, so anything (CLI, tests, docs) can use it.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Final


class JobState(IntEnum):
    """Where a supervised job is in its life."""

    STOPPED = 0
    STARTING = 10
    RUNNING = 20
    CHECKPOINTING = 30
    STOPPING = 40
    BACKOFF = 50
    WAITING_FOR_MEMORY = 60
    FINISHED = 100
    FATAL = 200


S = JobState
# A worker process exists (or may still exist, or is about to be spawned) in these states.
PROCESS_STATES: Final = frozenset({S.STARTING, S.RUNNING, S.CHECKPOINTING, S.STOPPING})
# The job will not run again without an operator.
TERMINAL_STATES: Final = frozenset({S.STOPPED, S.FINISHED, S.FATAL})
# States a `start` request may leave.
STARTABLE_STATES: Final = frozenset({S.STOPPED, S.FINISHED, S.FATAL, S.BACKOFF, S.WAITING_FOR_MEMORY})

TRANSITIONS: Final[dict[JobState, frozenset[JobState]]] = {
    S.STOPPED: frozenset({S.STARTING}),
    S.STARTING: frozenset({S.RUNNING, S.STOPPING, S.BACKOFF, S.FATAL, S.STOPPED, S.FINISHED}),
    # RUNNING -> STARTING: the worker checkpointed and exited on its own (SIGTERM from elsewhere, lost daemon).
    S.RUNNING: frozenset({S.CHECKPOINTING, S.STOPPING, S.BACKOFF, S.FINISHED, S.FATAL, S.STOPPED, S.STARTING,
                          S.WAITING_FOR_MEMORY}),
    S.CHECKPOINTING: frozenset({S.STOPPING, S.BACKOFF, S.FINISHED, S.FATAL, S.STOPPED, S.STARTING,
                                S.WAITING_FOR_MEMORY}),
    S.STOPPING: frozenset({S.BACKOFF, S.STOPPED, S.FATAL, S.FINISHED, S.STARTING, S.WAITING_FOR_MEMORY}),
    S.BACKOFF: frozenset({S.STARTING, S.STOPPED, S.FATAL}),
    S.WAITING_FOR_MEMORY: frozenset({S.STARTING, S.STOPPED}),
    S.FINISHED: frozenset({S.STARTING}),
    S.FATAL: frozenset({S.STARTING}),
}


class TransitionError(RuntimeError):
    """A state change the table does not allow: a bug in the daemon, never caused by input."""


def check_transition(old: JobState, new: JobState) -> None:
    """Raise TransitionError unless ``old -> new`` is in the table."""
    if new not in TRANSITIONS[old]:
        raise TransitionError(f"job state {old.name} cannot go to {new.name}")
