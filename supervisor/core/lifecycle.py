"""The lifecycle of one supervised job as a pure reducer: events in, actions out.

Everything a job decides lives here: starting, the escalation from warn band to checkpoint-and-exit to kill,
the restart ladder (finish, stop, restart now with the decided batch, back off after a crash, wait for
memory, give up), operator requests, shutdown, and the accounting of a departing worker's memory during an
overlapped restart. It reads no clock, file or process: events bring the time and the results of I/O, and
``Job`` (supervisor.daemon.job) carries out the actions. The simulator drives this same class, so there is one
restart ladder. The shape follows sans-I/O protocol libraries such as h11: a state machine object whose only
effects are on itself and in the actions it returns.

Rules worth stating once:
- A crash (an exit the daemon did not ask for, other than 0) is followed by a backoff and never changes the
  batch, whatever decision was pending.
- An exit the daemon asked for (status 75 after a checkpoint, or a kill that carried out a memory decision)
  adopts the decided batch and restarts at once.
- A stop (operator, removal, shutdown) wins over everything pending; a restart request starts the job again
  once it has stopped, unless the daemon is shutting down. Nothing starts while the daemon shuts down.
- A departing worker (it checkpointed on request and said goodbye; its successor may already run) counts in
  the job's footprint until it is reaped. The successor is spawned only when the departing footprint plus the
  successor's expected baseline fits the budget; otherwise when the old process is gone.
- A standby (``standby = "auto"``: the next worker, started early, waiting for its go) is the job's at most one,
  counted in its total and never its current worker; at a restart it becomes the life instead of a spawn
  (``supervisor.core.standby``).
- A gang (``Settings.ranks``/``world``: a data-parallel job whose ranks run as one life) moves as one: each rank
  is sampled against the budget on its own, and any rank's decision is the life's (the SDK makes every rank
  checkpoint at the same step). The life ends when its last rank has exited; the first rank to exit tells how
  (``Life.code``); a rank that crashes while others run gets the others terminated, and ranks still running
  ``kill_grace`` after a clean exit are killed as stragglers. A gang never overlaps two lives. Over several
  hosts the leader's ladder decides for all (``supervisor.core.peers``).
"""

from __future__ import annotations

import dataclasses
import itertools
import signal
from collections.abc import Callable, Sequence
from typing import Any

from protocol import Command, Step
from protocol.messages import EXIT_CHECKPOINTED
from supervisor.core import events as ev
from supervisor.core.crashes import Crash, CrashPolicy, classify
from supervisor.core.events import Action, Event, Refused
from supervisor.core.guard import floor_decision, guard_numbers, guard_on_sample
from supervisor.core.hangs import gang_hang, rank_exit_fields
from supervisor.core.life import INF, Departing, JobStats, Life, Rank, Settings
from supervisor.core.peers import PeerRole
from supervisor.core.policy import (
    Action as Do,
)
from supervisor.core.policy import (
    Decision,
    Diagnosis,
    Estimator,
    Limits,
    backoff_delay,
    on_sample,
    on_step,
    shrink,
)
from supervisor.core.standby import StandbyRole
from supervisor.core.states import (
    PROCESS_STATES,
    STARTABLE_STATES,
    TERMINAL_STATES,
    JobState,
    check_transition,
)

S = JobState
__all__ = ["Departing", "JobStats", "Life", "Lifecycle", "Rank", "Settings"]
STEP_FIELDS = tuple(field.name for field in dataclasses.fields(Step))  # recorded and published as they came
# (a ``steps`` frame has a list under each of these names)


class Lifecycle(PeerRole, StandbyRole):
    """The state of one job and the one function that changes it: ``handle(event) -> actions``."""

    def __init__(self, settings: Settings, limits: Limits) -> None:
        self.settings = settings
        self.limits = limits
        self.policy = settings.policy  # regrow_after_steps doubles after a failed regrowth (AIMD)
        self.state = S.STOPPED
        self.life: Life | None = None
        self.departing: dict[int, Departing] = {}
        self.batch, self.accum = settings.batch, settings.accum
        self.failures = 0  # consecutive lives without a newer checkpoint
        self.crashes = 0  # consecutive crashes, for the backoff delay
        self.retry_at = INF
        self.stop_reason: str | None = None  # set while a stop is requested
        self.restart_pending = False
        self.shutting_down = False
        self.deferred = False  # STARTING, waiting for a departing worker's memory before spawning
        self.reserve = 0  # the last life's baseline: what a successor needs once restored
        self.restart_reason = ""
        self.regrown_to = 0  # the batch the last regrowth went to, until it proves itself or breaches
        self.next: tuple[Settings, Limits] | None = None  # a reread config, applied at the next start
        self.last_sampled = 0
        self.said_hello = False  # a worker of this job has said hello (sdk = "auto": it speaks the SDK)
        self.stats = JobStats()
        self._lives = itertools.count(1)
        self._out: list[Action] = []
        self._init_peers(settings)
        self._init_standby()

    def handle(self, event: Event) -> list[Action]:
        """Apply one event; return the actions to carry out, in order. Raises Refused for an operator request
        the job cannot take now (nothing has changed then)."""
        self._out = []
        _HANDLERS[type(event)](self, event)
        return self._out

    @property
    def busy(self) -> bool:
        """A worker process of this job exists (current or departing) or is about to."""
        return self.life is not None or bool(self.departing) or self.deferred or self.standby is not None

    def headroom(self) -> int:
        """Bytes between the budget and the largest rank's last complete sample while the job runs steadily
        (RUNNING, nothing departing, every rank sampled); 0 otherwise, which keeps sampling at the full rate."""
        life = self.life
        if life is None or self.state != S.RUNNING or self.departing:  # (deferred is a STARTING matter)
            return 0
        sampled = [rank.last_bytes for rank in life.alive]
        if not sampled or min(sampled) <= 0:
            return 0
        held = self.standby.bytes if self.standby is not None else 0  # a standby's memory counts in the job's total
        return max(0, self.limits.budget - max(sampled) - held)

    def next_deadline(self) -> float:
        """The earliest time a Tick could change something (inf when only events can)."""
        departing = min((d.kill_at for d in self.departing.values()), default=INF)
        life = self.life
        if life is None:
            own = self.retry_at if self.state == S.BACKOFF else INF
        elif life.term_sent or self.state in (S.CHECKPOINTING, S.STOPPING):
            own = min(life.deadline, life.straggle_at)
        else:
            own = min([life.straggle_at, *(self._silent_at(r) for r in life.alive)])
        return min(own, departing, self.standby_deadline())

    def sdk_life(self, life: Life | None) -> bool:
        """Whether ``life`` speaks the SDK (public: the daemon's diagnosis asks it of the current life)."""
        return self._sdk(life)

    def _sdk(self, life: Life | None) -> bool:
        """Whether ``life`` is an SDK life: always (sdk = true), never (false), or once it said hello ("auto":
        a hello may come at any time in the life; until then the life is guarded by samples alone)."""
        sdk = self.settings.sdk
        return sdk is True or (sdk == "auto" and life is not None and life.hello)

    @property
    def guard_only(self) -> bool:
        """The job speaks of samples alone: sdk = false, or "auto" before any of its workers said hello."""
        return self.settings.sdk is False or (self.settings.sdk == "auto" and not self.said_hello)

    def _sdk_fields(self, life: Life | None, **fields: Any) -> dict[str, Any]:
        """``fields`` (batch, step, checkpoint...) for the records of an SDK life (``life`` None: the job's next
        one); nothing for a guard-only life, which has none of them."""
        return fields if (self._sdk(life) if life is not None else not self.guard_only) else {}

    def _silent_at(self, rank: Rank) -> float:
        """When rank ``rank`` counts as hung (no hello within startup_timeout, then no telemetry)."""
        return rank.last_heard + (self.settings.hang_timeout if rank.hello else self.settings.startup_timeout)

    # -- operator events ----------------------------------------------------------------------------

    def _start(self, e: ev.Start) -> None:
        if self.shutting_down:
            raise Refused("the daemon is shutting down")
        if self.state not in STARTABLE_STATES:
            raise Refused(f"job is {self.state.name}; cannot start")
        self.restart_pending = False
        self.want = True
        self._begin(e.now, e.reason, client=e.client)

    def _stop(self, e: ev.Stop) -> None:
        self.restart_pending = False
        self.want = False
        self._request_stop(e.now, e.reason, e.client)

    def _restart(self, e: ev.Restart) -> None:
        if self.shutting_down:
            raise Refused("the daemon is shutting down")
        self.want = True
        if self.deferred:
            return  # a start is already under way
        if self.life is None:
            self._begin(e.now, "restart requested", client=e.client)
            return
        self.restart_pending = True
        self._request_stop(e.now, "restart requested", e.client)

    def _shutdown(self, e: ev.Shutdown) -> None:
        self.shutting_down = True
        self.want = False
        if self.restart_pending:
            self.restart_pending = False
            self.stop_reason = None  # the job was meant to run: stop it as the daemon's, so it resumes with it
        self._request_stop(e.now, "daemon shutdown", e.client)

    def _checkpoint_now(self, e: ev.CheckpointNow) -> None:
        if self.settings.sdk is False:
            raise Refused("a guard-only job (sdk = false) cannot checkpoint")
        life = self.life
        if life is None or not life.hello or self.state not in (S.RUNNING, S.CHECKPOINTING):
            raise Refused(f"job has no connected worker ({self.state.name})")
        self._out.append(ev.Send(Command.CHECKPOINT, f"requested by {e.client}"))
        self._note("checkpoint_requested", client=e.client, step=life.last_step)

    def _set_limits(self, e: ev.SetLimits) -> None:
        lim = e.limits
        if not 0 < lim.warn <= lim.budget < lim.kill:
            raise Refused(f"need 0 < warn <= budget < kill, got warn {lim.warn}, budget {lim.budget}, kill {lim.kill}")
        self.limits = lim
        self._note("budget", budget=lim.budget, warn=lim.warn, kill=lim.kill, client=e.client)

    def reconfigure(self, settings: Settings, limits: Limits) -> None:
        """New settings from a reread config; they apply at the job's next start."""
        self.next = (settings, limits)

    # -- worker and OS events -----------------------------------------------------------------------

    def _rank(self, rank: int) -> Rank | None:
        """Rank ``rank`` of the current life, while it runs."""
        found = self.life.ranks.get(rank) if self.life is not None else None
        return found if found is not None and found.alive else None

    def _spawned(self, e: ev.Spawned) -> None:
        life = self.life
        rank = self._rank(e.rank)
        if life is None or life.id != e.life or rank is None:
            return
        rank.pid, rank.last_heard = e.pid, e.now
        life.start_checkpoint = e.start_checkpoint
        self._note("spawn", pid=e.pid, **self._sdk_fields(None, batch=life.batch, accum=life.accum,
                                                          from_checkpoint=e.start_checkpoint),
                   **self._rank_fields(e.rank, life=life.id))
        if self.settings.sdk is not True:
            why = "guard-only: no hello expected" if self.settings.sdk is False else "auto: guard-only until a hello"
            self._change(S.RUNNING, f"spawned ({why})", pid=e.pid)

    def _spawn_failed(self, e: ev.SpawnFailed) -> None:
        if self.life is None or self.life.id != e.life:
            return
        self.life = None
        self.failures += 1
        self._note("spawn_failed", error=e.error, level="error")
        if self.stop_reason is not None:
            self._change(S.STOPPED, self.stop_reason)
        else:
            self._after_failure(e.now, f"spawn failed: {e.error}")

    def _hello(self, e: ev.HelloIn) -> None:
        life, rank, m = self.life, self._rank(e.rank), e.msg
        if life is None or rank is None:
            return
        rank.hello, rank.last_heard, self.said_hello = True, e.now, True
        self._standby_hello(m)
        # The worker knows where it really resumed (a damaged newest checkpoint was skipped).
        rank.last_step = m.start_step
        self._note("hello", pid=m.pid, start_step=m.start_step, batch=m.batch, accum=m.accum,
                   **self._rank_fields(e.rank))
        if not life.hello:
            return  # the gang runs once every rank is there
        life.start_checkpoint = min(r.last_step for r in life.ranks.values())
        self.stats.target_steps = m.target_steps
        self.stats.steps_completed = max(self.stats.steps_completed, life.start_checkpoint)
        self._note_batch(life.start_checkpoint, m.batch, m.accum)
        if self.state == S.STARTING:
            self._change(S.RUNNING, "hello", pid=life.pid, step=life.start_checkpoint)

    def _heard(self, e: ev.Heard) -> None:
        rank = self._rank(e.rank)
        if rank is not None:
            rank.last_heard = e.now

    def _waiting(self, e: ev.Waiting) -> None:
        rank = self._rank(e.rank)
        if rank is not None:
            rank.waiting, rank.waiting_since = e.what, e.now - e.seconds

    def _step(self, e: ev.StepIn) -> None:
        life, rank, m = self.life, self._rank(e.rank), e.msg
        if life is None or rank is None:
            return
        rank.estimator.observe_step(m.step, m.footprint, _transient(m.mlx_peak, m.mlx_active), m.step_seconds)
        fields = {name: value for name in STEP_FIELDS if (value := getattr(m, name)) is not None}
        self._stepped(e, life, rank, "step", fields, (m.step_seconds,), m)

    def _steps(self, e: ev.StepsIn) -> None:
        """Several held steps in one frame: counters and estimates take every row at once, and the policy runs
        once, after the last row, as after that step alone (the worker held the others because they were calm,
        and a step that is not calm is the last row of its frame). One record for the telemetry file."""
        life, rank, m = self.life, self._rank(e.rank), e.msg
        if life is None or rank is None:
            return
        rank.estimator.observe_steps(m.step, m.footprint, list(map(_transient, m.mlx_peak, m.mlx_active)),
                                     m.step_seconds)
        fields = {name: column for name in STEP_FIELDS if (column := getattr(m, name)) is not None}
        self._stepped(e, life, rank, "steps", fields, m.step_seconds, m.row(-1))

    def _stepped(self, e: ev.StepIn | ev.StepsIn, life: Life, rank: Rank, kind: str, fields: dict[str, Any],
                 seconds: Sequence[float], last: Step) -> None:
        """After ``len(seconds)`` steps of ``rank`` (``last`` the latest): counters, recovery time, the telemetry
        record, the policy. (A batch change is noted at ``last``: a process's first step, the one that can bring
        one, is never held, so it comes alone.)"""
        stats = self.stats
        rank.last_heard = e.now
        rank.last_step = last.step
        rank.waiting, rank.waiting_since = "", INF
        stats.steps_completed = max(stats.steps_completed, last.step)
        if rank is life.lead:
            stats.final_loss = last.loss
            for took in seconds:
                if took > 0:
                    stats.steps_per_second = 0.9 * stats.steps_per_second + 0.1 / took
            self._note_batch(last.step, last.batch, last.accum)
        if stats.last_decision_at is not None and life.spawned_at >= stats.last_decision_at and all(
                r.estimator.steps_seen for r in life.ranks.values()):
            # The first productive step of every rank of a life started after a breach decision.
            stats.recoveries.append(e.now - stats.last_decision_at)
            stats.last_decision_at = None
        rank.healthy_steps += len(seconds)
        fields.update(leak_bytes_per_step=round(rank.estimator.slope), transient=rank.estimator.transient,
                      **self._rank_fields(e.rank))
        self._out.append(ev.Telemetry(kind, fields))
        if self.state == S.RUNNING:
            decision = self._on_step(life, rank)
            if decision.acts:
                self._act(life, rank, decision, e.now, step=last.step, sampled=rank.last_bytes,
                          budget=self.limits.budget, footprint_level=last.footprint)

    def _on_step(self, life: Life, rank: Rank) -> Decision:
        """The policy after one rank's step; a gang regrows only when every rank has room for it."""
        def decide(r: Rank) -> Decision:
            return on_step(r.estimator, self.life_limits(), life.batch, life.accum, r.healthy_steps, self.policy)

        decision = decide(rank)
        if decision.diagnosis is Diagnosis.REGROW and any(
                decide(r).diagnosis is not Diagnosis.REGROW for r in life.ranks.values() if r is not rank):
            return Decision(Do.NONE)
        return decision

    def _goodbye(self, e: ev.GoodbyeIn) -> None:
        life, rank = self.life, self._rank(e.rank)
        if life is None or rank is None:
            return
        rank.goodbye, rank.goodbye_step, rank.last_heard = e.reason, e.step, e.now
        self._note("worker_goodbye", reason=e.reason, step=e.step, history=False, **self._rank_fields(e.rank))
        requested = life.pending is not None and life.pending.action is Do.CHECKPOINT_EXIT
        if requested and e.reason != "finished" and self.stop_reason is None and not self.settings.gang:
            # Its checkpoint is durable: plan the successor now, while the kernel tears the old one down.
            self.departing[life.id] = Departing(e.now + self.settings.kill_grace + self.settings.departing_grace,
                                                rank.last_bytes, pid=rank.pid)
            self.reserve = rank.estimator.baseline or rank.min_bytes
            self._out.append(ev.Depart(life.id))
            self._on_exit(life, EXIT_CHECKPOINTED, e.now, e.newest)

    def _sample(self, e: ev.Sample) -> None:
        for life_id, nbytes in e.departing.items():
            if life_id in self.departing:
                self.departing[life_id].bytes = nbytes
        departing = sum(d.bytes for d in self.departing.values())
        total = (e.current or 0) + departing + self._standby_sample(e)
        life, rank = self.life, self._rank(e.rank)
        if life is None and not self.departing and self.standby is None:
            return
        if e.complete:
            self._count_sample(total, e.rank)
        self._standby_guard(total, e)
        if self.deferred and self._room(e.now):
            self._spawn(e.now)
            return
        policy_bytes = e.current
        over = self.departing and total >= self.limits.budget
        if over and not self._kill_departing(total) and total >= self.limits.kill:
            policy_bytes = total  # the departing workers are already killed: only the current one is left
        if life is None or rank is None or policy_bytes is None or self.state not in PROCESS_STATES:
            return
        if not self._sdk(life):
            self._guard_sample(life, rank, e, policy_bytes)
            return
        if e.complete:
            rank.last_bytes = e.current or 0
            rank.min_bytes = min(rank.min_bytes or rank.last_bytes, rank.last_bytes)
            rank.estimator.observe_sample(rank.last_bytes)
            if policy_bytes >= self.limits.warn:
                rank.healthy_steps = 0
        decision, rank.over_count = on_sample(policy_bytes, e.complete, rank.over_count, self.limits,
                                              rank.estimator, life.batch, life.accum, self.policy)
        if not decision.acts and e.floor and e.available < e.floor and self.state == S.RUNNING:
            reason = f"available {e.available} < floor {e.floor}"
            decision = Decision(Do.CHECKPOINT_EXIT, Diagnosis.SYSTEM_FLOOR, reason, life.batch, life.accum)
        if decision.acts:
            self._act(life, rank, decision, e.now, step=rank.last_step, sampled=policy_bytes,
                      budget=self.limits.budget, available=e.available, departing=departing)

    def _guard_sample(self, life: Life, rank: Rank, e: ev.Sample, sampled: int) -> None:
        """A guard-only life's sample, decided in its own terms: growth per second, leak or spike, SIGTERM or
        SIGKILL (``supervisor.core.guard``); no step, batch or checkpoint in its records."""
        if e.complete:
            rank.last_bytes = e.current or 0
            rank.min_bytes = min(rank.min_bytes or rank.last_bytes, rank.last_bytes)
            rank.growth.add(e.now, rank.last_bytes)
        decision, rank.over_count = guard_on_sample(sampled, e.complete, rank.over_count, self.limits, rank.growth,
                                                    self.policy, e.now)
        if not decision.acts and e.floor and e.available < e.floor and self.state == S.RUNNING:
            decision = floor_decision(e.available, e.floor)
        if decision.acts:
            numbers = {"sampled": sampled, "budget": self.limits.budget, "available": e.available,
                       **guard_numbers(rank.growth, self.limits, sampled, e.now), **self._rank_fields(rank.rank)}
            self._guard(life, rank, decision, e.now, numbers)

    def _count_sample(self, total: int, rank: int) -> None:
        stats = self.stats
        stats.samples += 1
        self.last_sampled = total
        stats.max_sampled = max(stats.max_sampled, total)
        stats.rank_max_sampled[rank] = max(stats.rank_max_sampled.get(rank, 0), total)
        stats.samples_over_budget += total > self.limits.budget
        stats.samples_over_kill += total > self.limits.kill

    def _kill_departing(self, total: int) -> bool:
        """SIGKILL departing workers not yet killed (they hold nothing: their checkpoint is durable)."""
        doomed = [life_id for life_id, d in self.departing.items() if not d.killed]
        for life_id in doomed:
            self.departing[life_id].killed = True
            self._out.append(ev.Signal(life_id, signal.SIGKILL))
            self._note("kill", signal="SIGKILL", life=life_id, pid=self.departing[life_id].pid, level="warning",
                       reason=f"job footprint {total} >= budget {self.limits.budget} with a departing worker")
        return bool(doomed)

    def _exited(self, e: ev.Exited) -> None:
        life = self.life
        rank = self._rank(e.rank)
        if life is None or rank is None:
            return
        # The failure's stderr is the first unclean rank's (even when it wrote nothing, as a SIGKILLed rank):
        # a survivor's "connection to a peer was lost" is fall-out, recorded in its own rank_exit.
        unclean = e.code not in (0, EXIT_CHECKPOINTED)
        if unclean and not any(r.exit_code not in (None, 0, EXIT_CHECKPOINTED) for r in life.ranks.values()):
            life.tail = e.stderr_tail
        rank.exit_code = e.code
        if life.first_exit is None:
            life.first_exit = e.code
        first, life.left = not life.left, True
        if self.settings.gang:
            self._note_rank_exit(life, rank, first, e.stderr_tail)
        if not life.alive:
            if not self._owed(life, e.now):
                self._on_exit(life, life.code(), e.now, e.newest)
            return
        if first:
            self._rank_left(life, f"rank {e.rank} {describe_exit(e.code)}", e.code, e.now)

    def _note_rank_exit(self, life: Life, rank: Rank, first: bool, tail: tuple[str, ...] = ()) -> None:
        """One ``rank_exit`` record per rank per life: how it ended. A rank that failed after a peer had crashed
        (a ring survivor raises "connection to a peer was lost") is labelled expected: the first exit is the cause."""
        fields = rank_exit_fields(life, rank, first, self.restart_reason, tail)
        self._note("rank_exit", level="warning" if fields.get("expected") is False else "info", **fields)

    def _rank_left(self, life: Life, who: str, code: int | None, now: float) -> None:
        """The first rank (or host) of a gang life is gone: a clean exit leaves the others ``kill_grace`` to
        follow; anything else is a crash, and the others are terminated."""
        if code in (0, EXIT_CHECKPOINTED):
            life.straggle_at = min(life.straggle_at, now + self.settings.kill_grace)
        elif not life.term_sent:
            life.crashed = True
            self._terminate(now, who)

    def _departed(self, e: ev.DepartedExited) -> None:
        if self.departing.pop(e.life, None) is None:
            return
        if e.code != EXIT_CHECKPOINTED:
            self._note("departed_worker_exit", life=e.life, code=e.code, level="warning", history=False)
        if self.deferred and self._room(e.now):
            self._spawn(e.now)

    def _sampled(self, e: ev.Sample) -> None:
        self._sample(e)
        self._standby_consider(e.now)

    def _tick(self, e: ev.Tick) -> None:
        now = e.now
        self._standby_tick(now)
        for life_id, departing in self.departing.items():
            if now >= departing.kill_at:
                departing.kill_at = INF
                if not departing.killed:
                    departing.killed = True
                    self._out.append(ev.Signal(life_id, signal.SIGKILL))
                    self._note("kill", signal="SIGKILL", life=life_id, pid=departing.pid,
                               reason="departing worker did not exit", level="warning")
        life = self.life
        if life is not None:
            if now >= life.straggle_at and life.alive:
                life.straggle_at = INF
                self._kill(life, signal.SIGKILL, "straggler: another rank had exited")
            if life.term_sent:
                if now >= life.deadline:
                    self._kill(life, signal.SIGKILL, "grace expired")
                    life.deadline = INF
            else:
                self._check_liveness(life, now)
        elif self.deferred:
            if self._room(now):
                self._spawn(now)
        elif self.state == S.BACKOFF and now >= self.retry_at:
            self._restart_now(now, self.restart_reason)
        elif self.state == S.WAITING_FOR_MEMORY and e.available >= e.resume_above:
            self._note("memory_back", available=e.available, resume_above=e.resume_above, history=False)
            self._restart_now(now, Diagnosis.SYSTEM_FLOOR.value)

    # -- the ladder ---------------------------------------------------------------------------------

    def _on_exit(self, life: Life, code: int, now: float, newest: int) -> None:
        """The current worker is gone (or departing): finish, stop, restart, back off or give up."""
        self.life = None
        pending = life.pending
        if self.settings.follower:
            self._follower_exit(life, code, pending, now)
            return
        code, pending = self._combine(life, code, pending)
        progress = newest > life.start_checkpoint
        asked = code == EXIT_CHECKPOINTED or (life.term_sent and pending is not None and not life.crashed)
        crash = not asked and code != 0
        failure = classify(code, life.tail, life.hello) if crash else None
        if failure is not None:
            self.stats.last_error = failure.record()
        # A smaller batch next time is a new attempt, not a repeat of the failed one.
        new_attempt = self._sdk(life) and asked and pending is not None and pending.next_batch != 0 and (
            (pending.next_batch, pending.next_accum) != (self.batch, self.accum))
        if progress:
            self.failures = self.crashes = 0  # the backoff grows only over crashes without progress
        elif not new_attempt:
            self.failures += 1
        self._note("exit", code=code, **self._sdk_fields(life, goodbye=life.lead.goodbye, step=life.last_step,
                                                         checkpoint=newest, progress=progress),
                   **crash_fields(failure))
        if not self._sdk(life):
            self._guard_exit(life, code, now, failure)
            return
        if code == EXIT_CHECKPOINTED and self.settings.gang:
            self._note_stop_steps(life)
        if asked and pending is not None and pending.next_batch:
            self.batch, self.accum = pending.next_batch, pending.next_accum
        if code == 0 and self.stop_reason is None:
            self._change(S.FINISHED, "worker finished", step=life.last_step)
        elif self.stop_reason is not None:
            self._change(S.STOPPED, self.stop_reason, step=life.last_step, checkpoint=newest)
            if self.restart_pending and not self.shutting_down:
                self.restart_pending = False
                self._begin(now, "restart requested")
        elif failure is not None and failure.policy is CrashPolicy.FATAL:
            self._change(S.FATAL, f"not retried: the worker's own error before its hello "
                                  f"({failure.describe(describe_exit(code))})", stderr_tail=list(failure.tail))
        elif self.failures >= self.settings.max_attempts:
            last = failure.describe(describe_exit(code)) if failure is not None else f"exit {code}"
            self._change(S.FATAL, f"{self.failures} attempts without progress (last {last})",
                         **crash_fields(failure))
        elif failure is not None and failure.policy is not CrashPolicy.BACKOFF:
            self._crash_restart(now, life, failure)
        elif crash or (pending is None and life.term_sent):
            reason = self.restart_reason if life.term_sent else describe_exit(code)
            self._after_failure(now, reason, failure)
        elif pending is not None and pending.diagnosis is Diagnosis.SYSTEM_FLOOR:
            self._change(S.WAITING_FOR_MEMORY, pending.reason)
        elif pending is not None and self.settings.mode == "stop":
            self._change(S.STOPPED, f"policy 'stop': {pending.reason}", step=life.last_step)
        else:
            reason = pending.diagnosis.value if pending is not None and pending.diagnosis else (
                life.lead.goodbye or "checkpointed")
            self._restart_now(now, reason)

    def _crash_restart(self, now: float, life: Life, failure: Crash) -> None:
        """A crash a fresh process clears (recycle) or a smaller batch avoids (shrink; a guard-only life has no
        batch and starts over): restart at once, not after a backoff."""
        if failure.policy is CrashPolicy.SHRINK and self._sdk(life):
            self.batch, self.accum = shrink(life.batch, life.accum, self.policy)
        self._note("crash_signature", signature=failure.signature, policy=failure.policy.value, hint=failure.hint,
                   **self._sdk_fields(life, batch=self.batch, accum=self.accum), level="warning")
        self._restart_now(now, failure.signature or "crash")

    def _guard_exit(self, life: Life, code: int, now: float, failure: Crash | None = None) -> None:
        """The ladder of a guard-only job: finish, stop, start over after a breach (restart = on-breach), or
        give up. Without checkpoints no life counts as progress, so breaches in a row end in FATAL."""
        pending = life.pending
        if self.stop_reason is not None:
            self._change(S.STOPPED, self.stop_reason, code=code)
            if self.restart_pending and not self.shutting_down:
                self.restart_pending = False
                self._begin(now, "restart requested")
        elif code == 0:
            self._change(S.FINISHED, "command exited 0")
        elif pending is None and failure is not None and failure.policy in (CrashPolicy.RECYCLE, CrashPolicy.SHRINK) \
                and self.settings.restart == "on-breach" and self.failures < self.settings.max_attempts:
            self._crash_restart(now, life, failure)
        elif pending is None:
            words = f"command exited {code}" if code >= 0 else f"command killed by signal {-code}"
            self._change(S.FATAL, failure.describe(words) if failure is not None else words, **crash_fields(failure))
        elif self.settings.restart == "never":
            self._change(S.STOPPED, f"{pending.reason} (restart = never)", code=code)
        elif self.failures >= self.settings.max_attempts:
            self._change(S.FATAL, f"{self.failures} breaches in a row (last: {pending.reason})")
        elif pending.diagnosis is Diagnosis.SYSTEM_FLOOR:
            self._change(S.WAITING_FOR_MEMORY, pending.reason)
        else:
            self._restart_now(now, pending.diagnosis.value if pending.diagnosis else "breach")

    def _after_failure(self, now: float, reason: str, failure: Crash | None = None) -> None:
        """Back off before the next start (``reason`` is the restart's; the state change quotes the crash)."""
        self.crashes += 1
        said = failure.describe(reason) if failure is not None else reason
        if self.failures >= self.settings.max_attempts:
            self._change(S.FATAL, f"{self.failures} attempts without progress: {said}", **crash_fields(failure))
            return
        delay = backoff_delay(self.crashes, self.settings.backoff_initial, self.settings.backoff_max)
        self.retry_at = now + delay
        self.restart_reason = reason
        self._change(S.BACKOFF, said, delay=round(delay, 3))

    def _restart_now(self, now: float, reason: str) -> None:
        """Start the next life; every start after the first counts as a restart."""
        self.stats.restarts += 1
        self.stats.restart_reasons[reason] += 1
        self._note("restart", reason=reason, **self._sdk_fields(None, batch=self.batch, accum=self.accum))
        self._begin(now, f"restart: {reason}")

    def _begin(self, now: float, reason: str, **fields: Any) -> None:
        """Enter STARTING and spawn, or wait for a departing worker's memory first."""
        if self.next is not None:
            self.settings, self.limits = self.next
            self.policy = self.settings.policy
            self.batch, self.accum = self.settings.batch, self.settings.accum
            self.regrown_to, self.next = 0, None
        self.stop_reason = None
        self.retry_at = INF
        self._change(S.STARTING, reason, **self._sdk_fields(None, batch=self.batch, accum=self.accum), **fields)
        if self._room(now):
            self._spawn(now)
        else:
            self.deferred = True
            self._note("spawn_deferred", departing=sum(d.bytes for d in self.departing.values()),
                       reserve=self.reserve, budget=self.limits.budget, **self._waiting_for(now))

    def _room(self, now: float) -> bool:
        """Whether a successor may start: it fits next to the departing workers' memory (always, once they are
        gone), and every host of a gang is ready for it."""
        departing = sum(d.bytes for d in self.departing.values())
        fits = not self.departing or departing + self.reserve <= self.limits.budget
        return fits and self._peers_ready(now)

    def _spawn(self, now: float, life_id: int | None = None) -> None:
        if life_id is None and self._standby_go(now):
            return  # the waiting standby becomes the life
        self.deferred = False
        life_id = next(self._lives) if life_id is None else life_id
        self.gen = life_id
        ranks = {r: Rank(r, Estimator(self.policy), last_heard=now) for r in self.settings.ranks}
        self.life = Life(life_id, now, self.batch, self.accum, ranks)
        self._out.append(ev.Spawn(life_id, self.batch, self.accum))

    def _request_stop(self, now: float, reason: str, client: str) -> None:
        """Checkpoint-and-exit (or kill a worker that cannot checkpoint yet); idempotent."""
        if self.stop_reason is not None:
            return  # already stopping: the first request's deadline stands
        self.stop_reason = reason
        life = self.life
        if life is None:
            self.deferred = False
            if self.state not in TERMINAL_STATES:
                self._change(S.STOPPED, reason, client=client)
            return
        if not life.alive:  # a gang leader waiting for other hosts' reports: stop without them
            self._on_exit(life, life.code(), now, life.start_checkpoint)
            return
        if not life.hello or not self._sdk(life):
            self._terminate(now, reason)
        elif life.term_sent or self.state == S.STOPPING:
            return  # already on its way out
        elif self.state == S.CHECKPOINTING:
            self._change(S.STOPPING, reason, client=client)  # the pending decision and its deadline stand
        else:
            self._ask_exit(now, Decision(Do.CHECKPOINT_EXIT, None, reason), S.STOPPING, client=client)

    # -- escalation ---------------------------------------------------------------------------------

    def _check_liveness(self, life: Life, now: float) -> None:
        if not self._sdk(life):
            return  # nothing is ever heard from a guard-only life: only its memory is watched
        if self.state in (S.CHECKPOINTING, S.STOPPING):
            if now >= life.deadline:
                self._terminate(now, f"checkpoint took longer than {self.settings.checkpoint_timeout}s")
            return
        for rank in life.alive:
            if now > self._silent_at(rank):
                if self.settings.gang and life.hello:
                    self._terminate(now, gang_hang(life, now, self.settings.hang_timeout))
                    return
                timeout = self.settings.hang_timeout if rank.hello else self.settings.startup_timeout
                what = "no telemetry" if rank.hello else "no hello"
                who = f"rank {rank.rank}: " if self.settings.gang else ""
                self._terminate(now, f"hung: {who}{what} for {now - rank.last_heard:.1f}s (timeout {timeout}s)")
                return

    def _act(self, life: Life, rank: Rank, decision: Decision, now: float, **numbers: Any) -> None:
        numbers.update(self._rank_fields(rank.rank))  # (an SDK life's; a guard-only one decides in _guard_sample)
        if decision.action is Do.CLEAR_CACHE:
            if rank.hello and now - rank.last_cache_clear >= self.settings.clear_cache_every:
                rank.last_cache_clear = now
                self._out.append(ev.Decided(decision, numbers))
                self._out.append(ev.Send(Command.CLEAR_CACHE, decision.reason, rank.rank))
            return
        if self.stats.first_breach_step is None and decision.diagnosis is not Diagnosis.REGROW:
            self.stats.first_breach_step = rank.last_step
        self._regrow_feedback(life, decision)
        if decision.action is Do.KILL:
            if not life.term_sent:
                self._out.append(ev.Decided(decision, numbers))
                life.pending = decision
                self.stats.last_decision_at = now
                self._terminate(now, decision.reason)
        elif self.state == S.RUNNING:
            self._out.append(ev.Decided(decision, numbers))
            self.stats.last_decision_at = now
            self._ask_exit(now, decision, S.CHECKPOINTING)

    def _guard(self, life: Life, rank: Rank, decision: Decision, now: float, numbers: dict[str, Any]) -> None:
        """A guard-only job cannot checkpoint: SIGTERM at the budget, SIGKILL at the ceiling (even while it
        handles an earlier SIGTERM: it may go on growing)."""
        ceiling = decision.action is Do.KILL
        if decision.action is Do.CLEAR_CACHE or (life.term_sent and not ceiling) or life.killed:
            return
        self._out.append(ev.Decided(decision, numbers))  # (no first_breach_step: a guard-only life has no steps)
        life.pending = decision
        self.stats.last_decision_at = now
        if ceiling and life.term_sent:
            life.killed = True
            self._kill(life, signal.SIGKILL, decision.reason)
            return
        life.killed = ceiling
        self._terminate(now, decision.reason, signal.SIGKILL if ceiling else signal.SIGTERM)

    def _regrow_feedback(self, life: Life, decision: Decision) -> None:
        """Additive increase, multiplicative decrease: a regrown batch that breaches doubles the wait."""
        if decision.diagnosis is Diagnosis.REGROW:
            self.regrown_to = decision.next_batch
        elif decision.next_batch and decision.next_batch < life.batch and life.batch == self.regrown_to:
            wait = self.policy.regrow_after_steps * 2
            self.policy = dataclasses.replace(self.policy, regrow_after_steps=wait)
            self.regrown_to = 0
            self._note("regrow_backoff", batch=life.batch, regrow_after_steps=wait)

    def _ask_exit(self, now: float, decision: Decision, state: JobState, **fields: Any) -> None:
        life = self.life
        assert life is not None
        life.pending = decision
        life.deadline = now + self.settings.checkpoint_timeout
        self._out.append(ev.Send(Command.CHECKPOINT_EXIT, decision.reason or "asked"))
        self._change(state, decision.reason, **fields)

    def _terminate(self, now: float, reason: str, signum: int = signal.SIGTERM) -> None:
        life = self.life
        if life is None or life.term_sent:
            return
        life.term_sent = True
        life.deadline = now + self.settings.kill_grace
        self._kill(life, signum, reason, grace=self.settings.kill_grace)
        self.restart_reason = reason
        if self.state != S.STOPPING:
            self._change(S.STOPPING, reason)

    def _kill(self, life: Life, signum: int, reason: str, **fields: Any) -> None:
        """Signal every live rank of ``life``: one ``kill`` record per process, naming the pid it went to."""
        for rank in life.alive:
            rank.signalled = rank.signalled or f"{signal.Signals(signum).name} from the supervisor: {reason}"
            self._note("kill", signal=signal.Signals(signum).name, reason=reason, pid=rank.pid, level="warning",
                       **fields, **self._sdk_fields(life, step=rank.last_step), **self._rank_fields(rank.rank))
        self._out.append(ev.Signal(life.id, signum))

    # -- bookkeeping --------------------------------------------------------------------------------

    def _change(self, new: JobState, reason: str, **fields: Any) -> None:
        """The one way to change state: validated against the table, then reported."""
        old = self.state
        if old == new:
            return
        check_transition(old, new)
        self.state = new
        self._out.append(ev.StateChanged(old.name, new.name, reason, fields))
        self._standby_on_state(new)

    def _note(self, event: str, level: str = "info", history: bool = True, **fields: Any) -> None:
        self._out.append(ev.Note(event, fields, level, history))

    def _emit(self, action: Action) -> None:
        self._out.append(action)

    def _rank_fields(self, rank: int, **fields: Any) -> dict[str, Any]:
        """``{"rank": rank}`` (plus ``fields``) for a gang's records; nothing for a plain job's."""
        return {"rank": rank, **fields} if self.settings.gang else {}

    def _note_stop_steps(self, life: Life) -> None:
        """A gang checkpointed and left: the step each rank checkpointed at (the SDK makes them equal)."""
        steps = [life.ranks[r].goodbye_step or 0 for r in sorted(life.ranks)]
        steps += [s for o in self._peer_outcomes(life.id) for s in o.stop_steps]
        self.stats.stop_steps.append(steps)
        self._note("gang_stop", steps=steps, equal=len(set(steps)) == 1)

    def _note_batch(self, step: int, batch: int, accum: int) -> None:
        history = self.stats.batch_history
        if not history or history[-1][1:] != [batch, accum]:
            history.append([step, batch, accum])
            if len(history) > 1:
                self._note("batch_change", step=step, batch=batch, accum=accum)


_HANDLERS: dict[type[Any], Callable[[Lifecycle, Any], None]] = {
    ev.Start: Lifecycle._start, ev.Stop: Lifecycle._stop, ev.Restart: Lifecycle._restart,
    ev.Shutdown: Lifecycle._shutdown, ev.CheckpointNow: Lifecycle._checkpoint_now,
    ev.SetLimits: Lifecycle._set_limits, ev.Spawned: Lifecycle._spawned, ev.SpawnFailed: Lifecycle._spawn_failed,
    ev.HelloIn: Lifecycle._hello, ev.StepIn: Lifecycle._step, ev.StepsIn: Lifecycle._steps, ev.Heard: Lifecycle._heard,
    ev.Waiting: Lifecycle._waiting,
    ev.GoodbyeIn: Lifecycle._goodbye, ev.Sample: Lifecycle._sampled, ev.Exited: Lifecycle._exited,
    ev.DepartedExited: Lifecycle._departed, ev.Tick: Lifecycle._tick,
    ev.PeerSync: Lifecycle._peer_sync, ev.LeaderSays: Lifecycle._leader_says,
    ev.StandbySpawned: Lifecycle._standby_spawned, ev.StandbySpawnFailed: Lifecycle._standby_spawn_failed,
    ev.StandbyIn: Lifecycle._standby_in, ev.StandbyHeard: Lifecycle._standby_heard,
    ev.StandbyFailed: Lifecycle._standby_broke, ev.StandbyExited: Lifecycle._standby_exited,
}


def _transient(peak: int, active: int | None) -> int:
    """A step's transient (MLX's peak over its active memory); 0 when active memory was not measured."""
    return 0 if active is None else peak - active


def crash_fields(failure: Crash | None) -> dict[str, Any]:
    """A crash's signature, hint and last stderr lines for its records (nothing without a crash)."""
    if failure is None:
        return {}
    return {"signature": failure.signature, "stderr_tail": list(failure.tail),
            **({"hint": failure.hint} if failure.hint else {})}


def describe_exit(code: int) -> str:
    return f"exit {code}" if code >= 0 else f"killed by signal {-code}"
