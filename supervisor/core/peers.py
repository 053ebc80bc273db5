"""The part of the job lifecycle that a gang over several hosts adds: leading and following.

Mixed into ``supervisor.core.lifecycle.Lifecycle`` (one lifecycle, one restart ladder): the leader's ladder
decides for the whole gang, on the combined outcome of every host (``supervisor.core.gang``); a follower's life
starts when the leader opens a generation and, once its ranks are gone, waits for the leader's next one instead
of climbing a ladder of its own. A plain job or a one-host gang has no peers and is no follower: every method
here is then a no-op.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from protocol.messages import EXIT_CHECKPOINTED
from supervisor.core import events as ev
from supervisor.core.gang import Outcome, Peer, combine, smallest
from supervisor.core.life import INF, Life, Settings
from supervisor.core.policy import Decision
from supervisor.core.states import TERMINAL_STATES, JobState

if TYPE_CHECKING:
    from supervisor.core.life import JobStats

S = JobState


class PeerRole:
    """Leader and follower behaviour of the lifecycle (state lives on the lifecycle itself)."""

    # -- provided by Lifecycle -------------------------------------------------------------------------
    settings: Settings
    life: Life | None
    state: JobState
    batch: int
    accum: int
    stop_reason: str | None
    restart_pending: bool
    shutting_down: bool
    deferred: bool
    stats: JobStats

    def _change(self, new: JobState, reason: str, **fields: Any) -> None:
        raise NotImplementedError

    def _note(self, event: str, level: str = "info", history: bool = True, **fields: Any) -> None:
        raise NotImplementedError

    def _spawn(self, now: float, life_id: int | None = None) -> None:
        raise NotImplementedError

    def _begin(self, now: float, reason: str, **fields: Any) -> None:
        raise NotImplementedError

    def _terminate(self, now: float, reason: str) -> None:
        raise NotImplementedError

    def _on_exit(self, life: Life, code: int, now: float, newest: int) -> None:
        raise NotImplementedError

    def _rank_left(self, life: Life, who: str, code: int | None, now: float) -> None:
        raise NotImplementedError

    def _note_stop_steps(self, life: Life) -> None:
        raise NotImplementedError

    def _emit(self, action: ev.Action) -> None:
        raise NotImplementedError

    # -- state -----------------------------------------------------------------------------------------

    def _init_peers(self, settings: Settings) -> None:
        self.peers = {host: Peer(host) for host in settings.peers}  # leader: what each follower said last
        self.gen = 0  # the newest life started (the leader's generation number)
        self.want = False  # follower: its own operator wants the job to run
        self.last_gen: tuple[str, int] = ("", 0)  # follower: newest (leader epoch, generation) started or skipped
        self.outcome: Outcome | None = None  # follower: how its ranks of last_gen ended
        self.joined = False  # follower: it has run a generation before (later ones count as restarts)

    # -- the leader ------------------------------------------------------------------------------------

    def _peers_ready(self, now: float) -> bool:
        """Whether a new generation may start: every follower is ready (a follower itself never starts one)."""
        if self.settings.follower:
            return False
        return all(p.ready(now, self.settings.peer_timeout) for p in self.peers.values())

    def _waiting_for(self, now: float) -> dict[str, Any]:
        if self.settings.follower:
            return {"waiting_for": "the gang leader"}
        hosts = [h for h, p in self.peers.items() if not p.ready(now, self.settings.peer_timeout)]
        return {"waiting_for_hosts": hosts} if hosts else {}

    def _peer_outcomes(self, gen: int) -> list[Outcome]:
        return [p.outcome for p in self.peers.values() if p.outcome is not None and p.outcome.gen == gen]

    def _owed(self, life: Life, now: float) -> bool:
        """Every local rank of ``life`` is gone: True while a follower has not said how its ranks ended."""
        owing = [h for h, p in self.peers.items() if p.owes(life.id)]
        if owing:
            self._note("gang_waiting", hosts=owing, gen=life.id,
                       reason=f"waiting for hosts {', '.join(owing)} to report generation {life.id}")
            if self.state != S.STOPPING and life.code() not in (0, EXIT_CHECKPOINTED):
                self._change(S.STOPPING, f"waiting for hosts {', '.join(owing)} to report generation {life.id}")
        return bool(owing)

    def _combine(self, life: Life, code: int, pending: Decision | None) -> tuple[int, Decision | None]:
        """The gang's exit status and decision: this host's with every follower's."""
        if not self.peers:
            return code, pending
        outcomes = self._peer_outcomes(life.id)
        return combine(code, outcomes), smallest([pending, *(o.decision for o in outcomes)])

    def _peer_sync(self, e: ev.PeerSync) -> None:
        peer = self.peers.get(e.host)
        if peer is None:
            self._emit(ev.Reply(e.host, {"error": f"host {e.host!r} is not a follower of this gang"}))
            return
        reported = e.outcome is not None and (peer.outcome is None or peer.outcome.gen != e.outcome.gen)
        peer.heard, peer.gen, peer.alive, peer.want = e.now, e.gen, e.alive, e.want
        peer.outcome, peer.ranks = e.outcome, list(e.ranks)
        life = self.life
        if reported and life is not None and e.outcome is not None and e.outcome.gen == life.id:
            self._note("gang_host_left", host=e.host, gen=life.id, code=e.outcome.code, step=e.outcome.step)
            if life.alive and not life.left:
                life.left = True
                self._rank_left(life, f"host {e.host} ended generation {life.id} ({e.outcome.code})",
                                e.outcome.code, e.now)
            elif not life.alive and not any(p.owes(life.id) for p in self.peers.values()):
                self._on_exit(life, life.code(), e.now, e.newest)
        elif self.deferred and self._peers_ready(e.now):
            self._spawn(e.now)
        if e.leaving:
            self._peer_leaving(peer, e)
        self._emit(ev.Reply(e.host, self._leader_view(peer)))

    def _peer_leaving(self, peer: Peer, e: ev.PeerSync) -> None:
        """A follower's daemon shuts down and said so: it is not ready again until it syncs anew, and a
        generation it still owes a report of ends for it now (its ranks never ran it, or are gone unreported),
        instead of the leader waiting for a host that is not coming back."""
        peer.heard, peer.want = -INF, False
        life = self.life
        self._note("gang_host_shutdown", host=e.host, gen=e.gen,
                   reason=f"the daemon of host {e.host} shut down" + (f" (its ranks ended {e.outcome.code})"
                                                                       if e.outcome is not None else ""))
        if life is None or not peer.owes(life.id):
            return
        peer.outcome = Outcome(life.id, None)
        if life.alive and not life.left:
            life.left = True
            self._rank_left(life, f"host {e.host} shut down during generation {life.id}", None, e.now)
        elif not life.alive and not any(p.owes(life.id) for p in self.peers.values()):
            self._on_exit(life, life.code(), e.now, e.newest)

    def _leader_view(self, peer: Peer) -> dict[str, Any]:
        """The reply to a follower: the generation, whether it is open (join it), the batch, the final state."""
        life = self.life
        open_ = life is not None and not life.left and not life.term_sent
        if open_:
            peer.told = self.gen
        batch, accum = (life.batch, life.accum) if life is not None else (self.batch, self.accum)
        end = self.state.name if self.state in TERMINAL_STATES else ""
        return {"gen": self.gen, "run": open_, "batch": batch, "accum": accum, "end": end,
                "reason": self.stop_reason or ""}

    # -- the follower ----------------------------------------------------------------------------------

    def follower_view(self) -> dict[str, Any]:
        """A follower's state for its next request to the leader."""
        life = self.life
        return {"epoch": self.last_gen[0], "gen": self.last_gen[1], "alive": len(life.alive) if life else 0,
                "want": self.want and not self.shutting_down,
                "outcome": self.outcome.to_wire() if self.outcome is not None else None}

    def _follower_exit(self, life: Life, code: int, pending: Decision | None, now: float) -> None:
        """A follower's ranks are gone: record how, and wait for the leader's next generation."""
        stop_steps = tuple(life.ranks[r].goodbye_step or 0 for r in sorted(life.ranks)) if code == 75 else ()
        self.outcome = Outcome(life.id, code, life.last_step, pending, stop_steps)
        self._note("exit", code=code, step=life.last_step, gen=life.id)
        if stop_steps:
            self._note_stop_steps(life)
        if self.stop_reason is not None:
            self._change(S.STOPPED, self.stop_reason, step=life.last_step)
            if self.restart_pending and not self.shutting_down:
                self.restart_pending = False
                self._begin(now, "restart requested")
        elif code == 0:
            self._change(S.FINISHED, "worker finished", step=life.last_step)
        else:
            self._change(S.STARTING, "waiting for the gang leader's next generation", code=code)
            self.deferred = True

    def _leader_says(self, e: ev.LeaderSays) -> None:
        if not self.settings.follower:
            return
        gen, life = (e.epoch, e.gen), self.life
        if life is not None:
            if e.run and gen != self.last_gen:
                self._terminate(e.now, f"the gang leader runs generation {e.gen}, not {life.id}")
            elif not e.run and gen == self.last_gen and life.alive:
                life.straggle_at = min(life.straggle_at, e.now + self.settings.kill_grace)
            return
        if e.run and gen != self.last_gen:
            if self.want and not self.shutting_down:
                self._join(e)
            return
        if not e.run and gen != self.last_gen:
            self.last_gen, self.outcome = gen, Outcome(e.gen, None)  # a generation it never ran is over
        if not e.run and e.end and self.deferred and self.state == S.STARTING:
            self.deferred = False
            self._change(JobState[e.end], f"gang leader: {e.end.lower()}" + (f" ({e.reason})" if e.reason else ""))

    def _join(self, e: ev.LeaderSays) -> None:
        """Start this host's ranks of the leader's generation."""
        if self.state != S.STARTING:
            self._change(S.STARTING, f"gang leader: generation {e.gen}")
        if self.joined:
            self.stats.restarts += 1
        self.joined = True
        self.batch, self.accum = e.batch, e.accum
        self.last_gen, self.outcome = (e.epoch, e.gen), None
        self._note("gang_join", gen=e.gen, batch=e.batch, accum=e.accum)
        self._spawn(e.now, life_id=e.gen)
