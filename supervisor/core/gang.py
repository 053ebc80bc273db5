"""A gang over several hosts, as the lifecycle sees it: the other daemons' reports and how they combine.

One daemon per host supervises its local ranks with its own lifecycle: spawning, sampling against the per-rank
budget, hang detection and memory decisions stay local (they must work through a partition). The daemon of
rank 0 leads: only its lifecycle runs the restart ladder, and a new generation starts only once every other
host is ready (reachable, wanting to run, none of its ranks alive), so two generations never overlap. The
followers poll the leader over the control channel (``gang_sync``): each request carries the follower's state
(``PeerSync``), each reply the leader's (``LeaderSays``), both with the generation. A follower reports how its
ranks of a generation ended (``Outcome``); the leader combines every host's outcome into the one exit status
and decision its ladder acts on. Plain data and pure functions only.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from protocol.messages import EXIT_CHECKPOINTED
from supervisor.core.policy import Action, Decision, Diagnosis

INF = math.inf


@dataclasses.dataclass(frozen=True, slots=True)
class Outcome:
    """How one host's ranks of generation ``gen`` ended."""

    gen: int
    code: int | None  # the host's life exit status; None: it never started this generation
    step: int = 0
    decision: Decision | None = None  # what the host's own policy decided (the batch to restart with)
    stop_steps: tuple[int, ...] = ()  # each of its ranks' checkpoint step, for a checkpointed exit

    def to_wire(self) -> dict[str, Any]:
        decision = self.decision
        return {
            "gen": self.gen, "code": self.code, "step": self.step, "stop_steps": list(self.stop_steps),
            "diagnosis": decision.diagnosis.value if decision and decision.diagnosis else "",
            "reason": decision.reason if decision else "",
            "next_batch": decision.next_batch if decision else 0,
            "next_accum": decision.next_accum if decision else 0,
        }

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Outcome:
        """An outcome from a follower's request; ValueError names a bad field."""
        try:
            decision = None
            if data.get("reason") or data.get("next_batch"):
                diagnosis = Diagnosis(data["diagnosis"]) if data.get("diagnosis") else None
                decision = Decision(Action.CHECKPOINT_EXIT, diagnosis, str(data.get("reason", "")),
                                    int(data.get("next_batch", 0)), int(data.get("next_accum", 0)))
            code = data.get("code")
            return cls(int(data["gen"]), None if code is None else int(code), int(data.get("step", 0)), decision,
                       tuple(int(s) for s in data.get("stop_steps", ())))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"gang outcome {str(data)[:200]}: {exc}") from None


@dataclasses.dataclass
class Peer:
    """What the leader knows of one follower host."""

    host: str
    heard: float = -INF
    gen: int = 0  # the newest generation it started (or skipped)
    alive: int = 0  # its ranks still running
    want: bool = False  # its operator wants the job to run
    outcome: Outcome | None = None  # how its ranks of ``gen`` ended
    told: int = 0  # the newest generation it was told to run
    ranks: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # its ranks, as status shows them

    def ready(self, now: float, timeout: float) -> bool:
        """Reachable, wanting to run, and none of its ranks alive: a new generation may start."""
        return now - self.heard <= timeout and self.want and self.alive == 0

    def owes(self, gen: int) -> bool:
        """It was told to run ``gen`` and has not yet said how that ended."""
        return self.told == gen and (self.outcome is None or self.outcome.gen != gen)


def severity(code: int) -> int:
    """Crash > checkpointed > finished: how host outcomes combine (their order across hosts is unknown)."""
    if code == 0:
        return 0
    return 1 if code == EXIT_CHECKPOINTED else 2


def combine(local: int, outcomes: list[Outcome]) -> int:
    """The gang's exit status from the leader's own and every follower's."""
    codes = [local, *(o.code for o in outcomes if o.code is not None)]
    return max(codes, key=severity)


def smallest(decisions: list[Decision | None]) -> Decision | None:
    """The decision to adopt: the smallest next batch any host asked for (a peak anywhere shrinks everyone)."""
    found = [d for d in decisions if d is not None]
    sized = [d for d in found if d.next_batch]
    if sized:
        return min(sized, key=lambda d: (d.next_batch, -d.next_accum))
    return found[0] if found else None
