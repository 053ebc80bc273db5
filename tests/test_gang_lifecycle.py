"""The gang parts of the pure lifecycle, table by table: ranks of one life, a leader's peers, a follower."""

from __future__ import annotations

import signal
from typing import Any

import pytest

from protocol import Hello, Step
from protocol.messages import EXIT_CHECKPOINTED
from supervisor.core import events as ev
from supervisor.core.gang import Outcome, combine, smallest
from supervisor.core.lifecycle import Lifecycle, Settings
from supervisor.core.policy import Action, Decision, Diagnosis, Limits, PolicyConfig
from supervisor.core.states import JobState

MiB = 2**20
LIMITS = Limits(850 * MiB, 1000 * MiB, 1100 * MiB)
PEAK = Decision(Action.CHECKPOINT_EXIT, Diagnosis.PEAK, "peak", 4, 2)


@pytest.fixture(autouse=True)
def no_orphans() -> None:
    """Nothing is spawned here."""


def gang(**settings: Any) -> Lifecycle:
    base: dict[str, Any] = {"ranks": (0, 1), "world": 2, "kill_grace": 2.0, "hang_timeout": 10.0,
                            "backoff_initial": 0.5}
    return Lifecycle(Settings(policy=PolicyConfig(), **{**base, **settings}), LIMITS)


def running(life: Lifecycle, now: float = 0.0) -> list[ev.Action]:
    """Start the gang and say hello on every local rank."""
    actions = life.handle(ev.Start(now))
    assert life.life is not None
    for rank in life.settings.ranks:
        actions += life.handle(ev.Spawned(life.life.id, now, 100 + rank, 0, rank))
        actions += life.handle(hello(now, rank, 8, 1))
    return actions


def hello(now: float, rank: int, batch: int = 8, accum: int = 1) -> ev.HelloIn:
    return ev.HelloIn(now, Hello("t", 100 + rank, "j", 0, 100, batch, accum), rank)


def step(now: float, number: int, rank: int) -> ev.StepIn:
    return ev.StepIn(now, Step(number, 8, 1, 1.0, 0.1, 0, 0, 0, 0), rank)


def signals(actions: list[ev.Action]) -> list[tuple[int, int | None]]:
    return [(a.signum, a.rank) for a in actions if isinstance(a, ev.Signal)]


class TestRanksOfOneLife:
    """A gang's life: every rank hellos, one rank's exit decides, the others follow or are killed."""

    def test_running_only_once_every_rank_said_hello(self) -> None:
        life = gang()
        life.handle(ev.Start(0.0))
        assert life.life is not None
        life.handle(hello(0.1, 0, 8, 1))
        assert life.state == JobState.STARTING
        life.handle(hello(0.2, 1, 8, 1))
        assert life.state == JobState.RUNNING

    def test_a_rank_that_crashes_gets_the_others_terminated_and_the_gang_backs_off(self) -> None:
        life = gang()
        running(life)
        actions = life.handle(ev.Exited(1.0, -signal.SIGKILL, 0, 1))
        assert signals(actions) == [(signal.SIGTERM, None)]
        assert life.state == JobState.STOPPING
        life.handle(ev.Exited(1.1, 1, 0, 0))  # the peer lost its connection
        assert life.state == JobState.BACKOFF and life.restart_reason == "rank 1 killed by signal 9"

    def test_ranks_still_running_kill_grace_after_a_checkpointed_exit_are_killed_as_stragglers(self) -> None:
        life = gang()
        running(life)
        life.handle(step(0.5, 5, 0))
        life.handle(ev.GoodbyeIn(1.0, "asked", 5, 5, 0))
        assert signals(life.handle(ev.Exited(1.0, EXIT_CHECKPOINTED, 5, 0))) == []
        assert life.state == JobState.RUNNING and life.life is not None
        assert life.next_deadline() == pytest.approx(3.0)
        assert signals(life.handle(ev.Tick(3.1, 0, 0))) == [(signal.SIGKILL, None)]
        life.handle(ev.Exited(3.2, -signal.SIGKILL, 5, 1))
        assert life.state == JobState.STARTING  # the gang checkpointed: restart at once, not a crash
        assert life.stats.restarts == 1

    def test_a_silent_rank_is_a_hang_of_the_whole_gang(self) -> None:
        life = gang()
        running(life)
        life.handle(step(9.0, 1, 0))
        actions = life.handle(ev.Tick(10.5, 0, 0))  # rank 1 silent since 0.0
        assert signals(actions) == [(signal.SIGTERM, None)]
        assert "rank 1" in life.restart_reason

    def test_a_breach_on_one_rank_asks_every_rank_to_checkpoint(self) -> None:
        life = gang()
        running(life)
        actions: list[ev.Action] = []
        for t in (1.0, 1.05):
            actions += life.handle(ev.Sample(t, 1050 * MiB, True, {}, 8 << 30, 0, rank=1))
        sends = [a for a in actions if isinstance(a, ev.Send)]
        assert [(s.action, s.rank) for s in sends] == [("checkpoint_exit", None)]
        assert life.state == JobState.CHECKPOINTING
        assert life.stats.rank_max_sampled == {1: 1050 * MiB}

    def test_samples_of_each_rank_are_held_against_the_budget_alone(self) -> None:
        life = gang()
        running(life)
        for t in (1.0, 1.05, 1.1):
            for rank in (0, 1):
                life.handle(ev.Sample(t, 600 * MiB, True, {}, 8 << 30, 0, rank=rank))
        assert life.state == JobState.RUNNING  # 2 x 600 MiB is over 1000 MiB, but each rank is under it

    def test_no_overlapped_restart_for_a_gang(self) -> None:
        life = gang()
        running(life)
        for t in (1.0, 1.05):
            life.handle(ev.Sample(t, 1050 * MiB, True, {}, 8 << 30, 0, rank=0))
        actions = life.handle(ev.GoodbyeIn(1.2, "asked", 3, 3, 0))
        assert not any(isinstance(a, (ev.Depart, ev.Spawn)) for a in actions)
        assert not life.departing

    def test_a_recovery_is_timed_to_the_first_step_of_every_rank_of_the_next_life(self) -> None:
        life = gang()
        running(life)
        for t in (1.0, 1.05):
            life.handle(ev.Sample(t, 1050 * MiB, True, {}, 8 << 30, 0, rank=1))
        assert life.state == JobState.CHECKPOINTING and life.stats.last_decision_at == 1.05
        for rank in (0, 1):
            life.handle(ev.GoodbyeIn(1.2, "asked", 3, 3, rank))
        for rank in (0, 1):
            life.handle(ev.Exited(1.3, EXIT_CHECKPOINTED, 3, rank))
        assert life.state == JobState.STARTING and life.life is not None and life.life.id == 2
        for rank in (0, 1):
            life.handle(ev.Spawned(2, 1.3, 200 + rank, 3, rank))
            life.handle(hello(1.4, rank))
        life.handle(step(2.0, 4, 0))
        life.handle(step(2.1, 5, 0))
        assert life.stats.recoveries == []  # rank 1 has not stepped yet
        life.handle(step(2.55, 4, 1))
        assert life.stats.recoveries == [pytest.approx(1.5)] and life.stats.last_decision_at is None

    def test_stop_steps_are_recorded_per_rank(self) -> None:
        life = gang()
        running(life)
        life.handle(ev.Stop(1.0))
        for rank in (0, 1):
            life.handle(ev.GoodbyeIn(1.1, "stop", 7, 7, rank))
        for rank in (0, 1):
            life.handle(ev.Exited(1.2, EXIT_CHECKPOINTED, 7, rank))
        assert life.state == JobState.STOPPED and life.stats.stop_steps == [[7, 7]]


class TestCombining:
    """Several hosts' outcomes make one: a crash anywhere is a crash; the smallest batch anyone asked for."""

    @pytest.mark.parametrize(("local", "others", "expected"), [
        (0, [0], 0), (75, [0], 75), (0, [75], 75), (75, [-9], -9), (1, [75], 1), (75, [None], 75)])
    def test_codes(self, local: int, others: list[int | None], expected: int) -> None:
        assert combine(local, [Outcome(1, c) for c in others]) == expected

    def test_smallest_batch_wins(self) -> None:
        leak = Decision(Action.CHECKPOINT_EXIT, Diagnosis.LEAK, "leak", 8, 1)
        assert smallest([leak, PEAK, None]) == PEAK
        assert smallest([None, None]) is None

    def test_outcomes_survive_the_wire(self) -> None:
        outcome = Outcome(3, 75, 40, PEAK, (40,))
        assert Outcome.from_wire(outcome.to_wire()) == outcome
        assert Outcome.from_wire(Outcome(2, None).to_wire()) == Outcome(2, None)
        with pytest.raises(ValueError, match="gang outcome"):
            Outcome.from_wire({"gen": "x"})


def sync(life: Lifecycle, now: float, gen: int = 0, alive: int = 0, want: bool = True,
         outcome: Outcome | None = None) -> dict[str, Any]:
    actions = life.handle(ev.PeerSync(now, "b", gen, alive, want, outcome, 0))
    [reply] = [a for a in actions if isinstance(a, ev.Reply)]
    return reply.fields


class TestLeader:
    """The leader opens a generation only when every follower is ready, and waits for every report."""

    def leader(self) -> Lifecycle:
        return gang(ranks=(0,), world=2, peers=("b",))

    def test_the_first_generation_waits_for_the_follower(self) -> None:
        life = self.leader()
        life.handle(ev.Start(0.0))
        assert life.life is None and life.deferred
        assert sync(life, 0.1, want=False)["run"] is False  # its operator stopped it
        reply = sync(life, 0.2)
        assert life.life is not None and reply == {"gen": 1, "run": True, "batch": 8, "accum": 1, "end": "",
                                                   "reason": ""}

    def test_a_stale_follower_is_not_ready(self) -> None:
        life = self.leader()
        sync(life, 0.0)
        life.handle(ev.Start(10.0))  # last heard 10 s ago, over peer_timeout
        assert life.deferred

    def test_local_exit_waits_for_the_followers_report_then_adopts_its_decision(self) -> None:
        life = self.leader()
        life.handle(ev.Start(0.0))
        sync(life, 0.1)
        assert life.life is not None
        life.handle(hello(0.2, 0, 8, 1))
        life.handle(ev.GoodbyeIn(1.0, "gang: a peer rank was asked", 5, 5, 0))
        life.handle(ev.Exited(1.0, EXIT_CHECKPOINTED, 5, 0))  # the follower's rank had a peak
        assert life.life is not None  # waiting for its report
        assert sync(life, 1.1, gen=1, alive=1)["run"] is False  # generation 1 is closing
        sync(life, 1.2, gen=1, outcome=Outcome(1, EXIT_CHECKPOINTED, 5, PEAK, (5,)))
        assert life.state == JobState.STARTING and (life.batch, life.accum) == (4, 2)
        assert life.stats.stop_steps == [[5, 5]]

    def test_a_follower_that_reports_a_crash_first_gets_the_local_ranks_terminated(self) -> None:
        life = self.leader()
        life.handle(ev.Start(0.0))
        sync(life, 0.1)
        life.handle(hello(0.2, 0, 8, 1))
        actions = life.handle(ev.PeerSync(1.0, "b", 1, 0, True, Outcome(1, -9), 0))
        assert signals(actions) == [(signal.SIGTERM, None)]
        life.handle(ev.Exited(1.1, 1, 0, 0))
        assert life.state == JobState.BACKOFF

    def test_stopping_while_waiting_for_a_silent_follower_stops_without_it(self) -> None:
        life = self.leader()
        life.handle(ev.Start(0.0))
        sync(life, 0.1)
        life.handle(hello(0.2, 0, 8, 1))
        life.handle(ev.Exited(1.0, 1, 0, 0))
        assert life.state == JobState.STOPPING and life.life is not None
        life.handle(ev.Stop(50.0))
        assert life.state == JobState.STOPPED and life.life is None

    def test_an_unknown_host_is_refused(self) -> None:
        life = self.leader()
        actions = life.handle(ev.PeerSync(0.0, "stranger", 0, 0, True, None, 0))
        assert [a.fields for a in actions if isinstance(a, ev.Reply)] == [
            {"error": "host 'stranger' is not a follower of this gang"}]


def says(life: Lifecycle, now: float, gen: int, run: bool, end: str = "", epoch: str = "e1") -> list[ev.Action]:
    return life.handle(ev.LeaderSays(now, epoch, gen, run, 4, 2, end, ""))


class TestFollower:
    """A follower starts what the leader opens and never restarts by itself."""

    def follower(self) -> Lifecycle:
        return gang(ranks=(1,), world=2, follower=True)

    def test_start_waits_for_the_leader_then_joins_its_generation_with_its_batch(self) -> None:
        life = self.follower()
        life.handle(ev.Start(0.0))
        assert life.state == JobState.STARTING and life.life is None
        actions = says(life, 0.1, 3, True)
        assert [(a.life, a.batch, a.accum) for a in actions if isinstance(a, ev.Spawn)] == [(3, 4, 2)]

    def test_after_its_ranks_exit_it_reports_and_waits_instead_of_restarting(self) -> None:
        life = self.follower()
        life.handle(ev.Start(0.0))
        says(life, 0.1, 3, True)
        life.handle(hello(0.2, 1, 4, 2))
        actions = life.handle(ev.Exited(1.0, -9, 0, 1))
        assert not any(isinstance(a, ev.Spawn) for a in actions)
        assert life.state == JobState.STARTING and life.stats.restarts == 0
        assert life.follower_view()["outcome"]["code"] == -9
        assert not says(life, 1.1, 3, False)  # the same generation: nothing to do
        assert any(isinstance(a, ev.Spawn) for a in says(life, 2.0, 4, True))
        assert life.stats.restarts == 1

    def test_a_generation_it_never_ran_is_reported_as_skipped(self) -> None:
        life = self.follower()
        says(life, 0.0, 5, False)
        assert life.follower_view()["gen"] == 5 and life.follower_view()["outcome"]["code"] is None

    def test_it_mirrors_the_leaders_final_state_while_waiting(self) -> None:
        life = self.follower()
        life.handle(ev.Start(0.0))
        says(life, 0.1, 0, False, end="FINISHED")
        assert life.state == JobState.FINISHED and life.want
        assert any(isinstance(a, ev.Spawn) for a in says(life, 5.0, 1, True))  # the leader started again

    def test_its_own_stop_keeps_it_out(self) -> None:
        life = self.follower()
        life.handle(ev.Start(0.0))
        life.handle(ev.Stop(0.1))
        assert not says(life, 0.2, 1, True) and life.follower_view()["want"] is False

    def test_a_new_leader_epoch_is_a_new_generation(self) -> None:
        life = self.follower()
        life.handle(ev.Start(0.0))
        says(life, 0.1, 1, True)
        life.handle(hello(0.2, 1, 4, 2))
        life.handle(ev.Exited(1.0, 75, 0, 1))
        assert any(isinstance(a, ev.Spawn) for a in says(life, 2.0, 1, True, epoch="e2"))

    def test_ranks_of_a_generation_the_leader_left_behind_are_terminated(self) -> None:
        life = self.follower()
        life.handle(ev.Start(0.0))
        says(life, 0.1, 1, True)
        life.handle(hello(0.2, 1, 4, 2))
        assert signals(says(life, 1.0, 2, True)) == [(signal.SIGTERM, None)]
