"""The standby: the next worker, started while the current life still trains, so a restart costs a restore.

Mixed into ``supervisor.core.lifecycle.Lifecycle`` (one reducer; state lives on it). A standby is a worker that
has not begun (docs/PROTOCOL.md section 11): spawned in its own process group with a token of its own, it imports
and waits; at the next restart the daemon sends it ``go`` and it becomes the job's life, with the life id it was
given at its spawn. Until then it is never the job's current worker.

Rules worth stating once:
- **When.** ``standby = "auto"``, a plain SDK job (a gang gets none in this version) whose current worker's hello
  listed the ``standby`` feature (guard-only workers and older SDKs never get one); the life RUNNING past its
  warm-up, nothing pending, departing or deferred, no stop asked and no reread config waiting; and the job is
  expected to restart: its life leaks (slope over ``leak_threshold``) or the job has restarted before.
- **Memory first.** It starts only when the life's last sample, plus the life's margin (its per-step transient and
  its growth over the steps a checkpoint-and-exit needs), plus what a standby is expected to hold (the largest
  sample of an earlier one, else ``Settings.standby_estimate``) stays under the warn band. Its samples count in the
  job's total (``last_sampled``, the over-budget counters); the life's step policy runs against the bands lowered
  by them, so a leak recycles before the total reaches the budget. It is killed at once (SIGKILL: it holds
  nothing) when a sample puts the job's total at the budget, when available memory is under the floor, on a stop,
  a terminal state or waiting for memory, on a reread config, and at a restart it cannot serve (another batch, or
  waiting yet ``YOUNG`` seconds after its spawn).
- **At most one.** Its record stays until its process is reaped, killed or not, so a replacement waits for the old
  one's exit and its memory is counted until then.
- **Replaced, never in the way.** A standby that dies, or says nothing within ``startup_timeout`` of its spawn, or
  nothing for ``hang_timeout`` after, is killed and another is started after a delay (1, 2, 4 s...); after
  ``MAX_FAILURES`` in a row the job gets none until a standby serves again. None of it touches the running life.
"""

from __future__ import annotations

import dataclasses
import itertools
import signal
from typing import TYPE_CHECKING, Any

from protocol import Hello
from supervisor.core import events as ev
from supervisor.core.life import INF, Departing, Life, Rank, Settings
from supervisor.core.policy import Estimator, Limits, PolicyConfig
from supervisor.core.states import TERMINAL_STATES, JobState

if TYPE_CHECKING:
    from supervisor.core.life import JobStats

S = JobState
FEATURE = "standby"  # in a hello's features (worker.standby.FEATURE)
MAX_FAILURES = 3  # standbys in a row that died or hung before the job stops starting them
RETRY_MAX = 30.0  # seconds: the longest wait before the next standby after a failed one
YOUNG = 10.0  # seconds: a standby not waiting yet at a restart still serves it when younger (its go is sent the
# moment it says standby); an older one is taken for stuck, and a fresh worker is spawned instead


@dataclasses.dataclass
class Standby:
    """The job's standby, from its spawn until its process is reaped (or it became a life)."""

    id: int  # the life it becomes at its go
    spawned_at: float
    batch: int
    accum: int
    last_heard: float
    pid: int = 0
    ready: bool = False  # it said ``standby``: it waits for its go
    bytes: int = 0  # its group's last sample
    killed: str = ""  # why the daemon killed it ("": alive and wanted)
    settings: Settings | None = None  # the job's settings it was started with (a reread config needs another)


class StandbyRole:
    """The standby's part of the lifecycle (see the module's rules)."""

    # -- provided by Lifecycle -------------------------------------------------------------------------
    settings: Settings
    limits: Limits
    policy: PolicyConfig
    life: Life | None
    state: JobState
    batch: int
    accum: int
    stop_reason: str | None
    restart_pending: bool
    shutting_down: bool
    deferred: bool
    departing: dict[int, Departing]
    next: tuple[Settings, Limits] | None
    stats: JobStats
    gen: int
    _lives: itertools.count[int]

    def _note(self, event: str, level: str = "info", history: bool = True, **fields: Any) -> None:
        raise NotImplementedError

    def _emit(self, action: ev.Action) -> None:
        raise NotImplementedError

    def _sdk(self, life: Life | None) -> bool:
        raise NotImplementedError

    # -- state and queries -----------------------------------------------------------------------------

    def _init_standby(self) -> None:
        self.standby: Standby | None = None
        self.standby_capable = False  # the current life's hello listed the standby feature
        self.standby_failures = 0  # standbys in a row that died or hung
        self.standby_retry_at = -INF
        self.standby_seen = 0  # the largest sample of any standby of this job: what the next one will hold

    def standby_deadline(self) -> float:
        """When the standby counts as hung (inf without a live one)."""
        sb = self.standby
        if sb is None or sb.killed:
            return INF
        return sb.last_heard + (self.settings.hang_timeout if sb.ready else self.settings.startup_timeout)

    def life_limits(self) -> Limits:
        """The bands the current life's step policy runs against: the job's, less what its standby holds."""
        held = self.standby.bytes if self.standby is not None else 0
        if not held:
            return self.limits
        lim = self.limits
        return Limits(max(0, lim.warn - held), max(1, lim.budget - held), max(2, lim.kill - held))

    def _standby_hello(self, hello: Hello) -> None:
        """The current life's hello: whether its successors may be standbys (its SDK can wait for a go)."""
        self.standby_capable = FEATURE in (hello.features or "").split()

    # -- starting one ------------------------------------------------------------------------------------

    def _standby_wanted(self, now: float) -> bool:
        s, life = self.settings, self.life
        if s.standby != "auto" or s.gang or s.follower or self.standby is not None or not self.standby_capable:
            return False
        if life is None or self.state != S.RUNNING or not life.hello or not self._sdk(life):
            return False
        if life.pending is not None or life.term_sent or self.departing or self.deferred:
            return False
        if self.stop_reason is not None or self.shutting_down or self.next is not None:
            return False
        if now < self.standby_retry_at or self.standby_failures >= MAX_FAILURES:
            return False
        rank = life.lead
        if rank.estimator.steps_seen <= self.policy.warmup_steps or rank.last_bytes <= 0:
            return False
        return rank.estimator.slope > self.policy.leak_threshold or self.stats.restarts > 0

    def _standby_consider(self, now: float) -> None:
        """Start a standby when the job wants one and it fits with the life's margin under the warn band."""
        if not self._standby_wanted(now):
            return
        assert self.life is not None
        life, rank = self.life, self.life.lead
        expected = self.standby_seen or self.settings.standby_estimate
        margin = _margin(rank, self.policy)
        if rank.last_bytes + margin + expected > self.limits.warn:
            return
        sb = Standby(next(self._lives), now, life.batch, life.accum, last_heard=now, settings=self.settings)
        self.standby = sb
        self.stats.standbys += 1
        self._note("standby_spawn", life=sb.id, batch=sb.batch, accum=sb.accum, sampled=rank.last_bytes,
                   margin=margin, expected=expected, warn=self.limits.warn)
        self._emit(ev.SpawnStandby(sb.id, sb.batch, sb.accum))

    # -- its events --------------------------------------------------------------------------------------

    def _ours(self, life: int) -> Standby | None:
        sb = self.standby
        return sb if sb is not None and sb.id == life else None

    def _standby_spawned(self, e: ev.StandbySpawned) -> None:
        sb = self._ours(e.life)
        if sb is not None:
            sb.pid, sb.last_heard = e.pid, e.now

    def _standby_spawn_failed(self, e: ev.StandbySpawnFailed) -> None:
        if self._ours(e.life) is not None:
            self.standby = None
            self._note("standby_spawn_failed", life=e.life, error=e.error, level="warning")
            self._standby_failure(e.now)

    def _standby_in(self, e: ev.StandbyIn) -> None:
        sb = self._ours(e.life)
        if sb is not None and not sb.killed:
            sb.ready, sb.last_heard = True, e.now
            self._note("standby_ready", life=e.life, pid=sb.pid, seconds=round(e.now - sb.spawned_at, 3),
                       history=False)

    def _standby_heard(self, e: ev.StandbyHeard) -> None:
        sb = self._ours(e.life)
        if sb is not None:
            sb.last_heard = e.now

    def _standby_broke(self, e: ev.StandbyFailed) -> None:
        if self._ours(e.life) is not None:
            self._dismiss(f"standby broke the protocol: {e.why}", level="warning")
            self._standby_failure(e.now)

    def _standby_exited(self, e: ev.StandbyExited) -> None:
        sb = self._ours(e.life)
        if sb is None:
            return
        self.standby = None
        if not sb.killed:
            self._note("standby_exit", life=e.life, pid=sb.pid, code=e.code, level="warning")
            self._standby_failure(e.now)

    def _standby_failure(self, now: float) -> None:
        self.standby_failures += 1
        self.standby_retry_at = now + min(RETRY_MAX, 2.0 ** (self.standby_failures - 1))
        if self.standby_failures >= MAX_FAILURES:
            self._note("standby_disabled", failures=self.standby_failures, level="warning",
                       reason=f"{self.standby_failures} standbys in a row died or hung")

    # -- memory, time, state -------------------------------------------------------------------------------

    def _standby_sample(self, e: ev.Sample) -> int:
        """Record the standby's sample; its bytes, for the job's total (0 without one)."""
        sb = self.standby
        if sb is None or e.standby is None:
            return 0
        sb.bytes = e.standby
        self.standby_seen = max(self.standby_seen, e.standby) if not sb.killed else self.standby_seen
        self.stats.standby_max_bytes = max(self.stats.standby_max_bytes, e.standby)
        return e.standby

    def _standby_guard(self, total: int, e: ev.Sample) -> None:
        """Kill the standby at once when the job's total reaches the budget or the system is under its floor."""
        if total >= self.limits.budget:
            self._dismiss(f"job footprint {total} >= budget {self.limits.budget}", total=total)
        elif e.floor and e.available < e.floor:
            self._dismiss(f"available {e.available} < floor {e.floor}")

    def _standby_tick(self, now: float) -> None:
        sb = self.standby
        if sb is not None and self.next is not None:
            self._dismiss("config reread: the next life starts from the new config")
        elif sb is not None and not sb.killed and now >= self.standby_deadline():
            what = "nothing" if sb.ready else "no standby message"
            self._dismiss(f"standby hung: {what} for {now - sb.last_heard:.1f}s", level="warning")
            self._standby_failure(now)

    def _standby_on_state(self, new: JobState) -> None:
        """No standby for a job that is done, stopping for good, or waiting for memory."""
        if new in TERMINAL_STATES or new == S.WAITING_FOR_MEMORY or (
                self.stop_reason is not None and not self.restart_pending):
            self._dismiss(f"job {new.name}")

    def _dismiss(self, reason: str, level: str = "info", **fields: Any) -> None:
        sb = self.standby
        if sb is None or sb.killed:
            return
        sb.killed = reason
        self._emit(ev.Signal(sb.id, signal.SIGKILL))
        self._note("standby_kill", life=sb.id, pid=sb.pid, reason=reason, level=level, **fields)

    # -- the go --------------------------------------------------------------------------------------------

    def _standby_go(self, now: float) -> bool:
        """Make the waiting standby the next life when it can serve it (else dismiss it); whether it did."""
        sb = self.standby
        if sb is None or sb.killed:
            return False
        if not sb.ready and now - sb.spawned_at > YOUNG:
            self._dismiss(f"not waiting yet {now - sb.spawned_at:.1f}s after its spawn: a fresh spawn instead")
            return False
        if sb.settings is not self.settings:
            self._dismiss("config reread: the next life starts from the new config")
            return False
        if (sb.batch, sb.accum) != (self.batch, self.accum):
            self._dismiss(f"started at batch {sb.batch}x{sb.accum}; the next life runs {self.batch}x{self.accum}")
            return False
        self.standby = None
        self.standby_failures = 0
        self.stats.standbys_used += 1
        self.deferred = False
        self.gen = sb.id
        ranks = {r: Rank(r, Estimator(self.policy), last_heard=now) for r in self.settings.ranks}
        self.life = Life(sb.id, now, self.batch, self.accum, ranks)
        self._note("standby_go", life=sb.id, pid=sb.pid, batch=self.batch, accum=self.accum,
                   waited=round(now - sb.spawned_at, 3), ready=sb.ready)
        self._emit(ev.Go(sb.id, self.batch, self.accum))
        return True


def _margin(rank: Rank, policy: PolicyConfig) -> int:
    """What the life needs above its level: its per-step transient and its growth over the steps a
    checkpoint-and-exit needs (the ones the command lands late included)."""
    est = rank.estimator
    return int(est.transient + max(0.0, est.slope) * (policy.checkpoint_steps + est.late_steps))
