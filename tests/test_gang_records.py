"""What the lifecycle records of a job: every decision kind carries the fields docs/running.md names and never
shadows the log's own keys; a gang records every rank's exit and names the pid of every process it signals."""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

import pytest

from protocol import Hello, Step
from protocol.messages import EXIT_CHECKPOINTED
from supervisor.core import events as ev
from supervisor.core.gang import Outcome
from supervisor.core.lifecycle import Lifecycle, Settings
from supervisor.core.policy import Action, Diagnosis, Limits, PolicyConfig
from supervisor.core.states import JobState

MiB = 2**20
LIMITS = Limits(850 * MiB, 1000 * MiB, 1100 * MiB)
# What docs/running.md promises of every decision record (`decision` with `action`, `reason`, `sampled`, `budget`,
# `step`, and `diagnosis` / `next_batch` where they apply).
DECISION_FIELDS = {"action", "reason", "sampled", "budget", "step"}


@pytest.fixture(autouse=True)
def no_orphans() -> None:
    """Nothing is spawned here."""


def job(ranks: tuple[int, ...] = (0,), sdk: bool = True, **policy: Any) -> Lifecycle:
    settings = Settings(policy=PolicyConfig(**{"max_batch": 8, **policy}), ranks=ranks, world=len(ranks), sdk=sdk,
                        kill_grace=2.0, hang_timeout=10.0, batch=8)
    return Lifecycle(settings, LIMITS)


def running(life: Lifecycle, batch: int = 8, accum: int = 1) -> list[ev.Action]:
    actions = life.handle(ev.Start(0.0))
    assert life.life is not None
    for rank in life.settings.ranks:
        actions += life.handle(ev.Spawned(life.life.id, 0.0, 100 + rank, 0, rank))
        if life.settings.sdk:
            actions += life.handle(ev.HelloIn(0.0, Hello("t", 100 + rank, "j", 0, 1000, batch, accum), rank))
    return actions


def step(number: int, footprint: int, batch: int = 8, rank: int = 0) -> ev.StepIn:
    return ev.StepIn(float(number), Step(number, batch, 1, 1.0, 0.1, 0, 0, 0, footprint), rank)


def sample(now: float, nbytes: int, available: int = 10**12, floor: int = 0, rank: int = 0) -> ev.Sample:
    return ev.Sample(now, nbytes, True, {}, available, floor, rank)


def decided(actions: list[ev.Action]) -> list[ev.Decided]:
    return [a for a in actions if isinstance(a, ev.Decided)]


def clear_cache(life: Lifecycle) -> list[ev.Action]:
    running(life)
    return life.handle(sample(1.0, 900 * MiB))


def peak(life: Lifecycle) -> list[ev.Action]:
    running(life)
    return life.handle(sample(1.0, 1010 * MiB)) + life.handle(sample(1.1, 1010 * MiB))


def leak(life: Lifecycle) -> list[ev.Action]:
    running(life)
    actions = []
    for number in range(1, 21):  # 5 MiB a step, far from the budget
        actions += life.handle(step(number, 100 * MiB + number * 5 * MiB))
    return actions + life.handle(sample(30.0, 1010 * MiB)) + life.handle(sample(30.1, 1010 * MiB))


def leak_predicted(life: Lifecycle) -> list[ev.Action]:
    running(life)
    actions = []
    for number in range(1, 40):  # 40 MiB a step: the slope reaches the budget
        actions += life.handle(step(number, 300 * MiB + number * 40 * MiB))
        if decided(actions):
            break
    return actions


def kill_ceiling(life: Lifecycle) -> list[ev.Action]:
    running(life)
    return life.handle(sample(1.0, 1200 * MiB))


def system_floor(life: Lifecycle) -> list[ev.Action]:
    running(life)
    return life.handle(sample(1.0, 100 * MiB, available=1 * MiB, floor=2 * MiB))


def regrow(life: Lifecycle) -> list[ev.Action]:
    running(life, batch=4, accum=2)
    life.batch, life.accum = 4, 2
    assert life.life is not None
    life.life.batch, life.life.accum = 4, 2
    actions = []
    for number in range(1, 12):
        for rank in sorted(life.settings.ranks, reverse=True):  # a gang regrows once every rank has room
            actions += life.handle(step(number, 100 * MiB, batch=4, rank=rank))
    return actions


# Every kind of decision the lifecycle makes (action, diagnosis) and a scenario that makes it.
SCENARIOS: dict[tuple[str, str | None], tuple[Callable[[Lifecycle], list[ev.Action]], dict[str, Any]]] = {
    ("clear_cache", None): (clear_cache, {}),
    ("checkpoint_exit", "peak"): (peak, {}),
    ("checkpoint_exit", "leak"): (leak, {}),
    ("checkpoint_exit", "leak_predicted"): (leak_predicted, {}),
    ("checkpoint_exit", "regrow"): (regrow, {"regrow_after_steps": 5}),
    ("checkpoint_exit", "system_floor"): (system_floor, {}),
    ("kill", "kill_ceiling"): (kill_ceiling, {}),
}


class TestDecisionFields:
    """Every decision kind carries action, reason, sampled, budget and step, and no field named like the log's own
    keys (level, event, timestamp, time)."""

    def test_the_scenarios_cover_every_action_and_diagnosis(self) -> None:
        kinds = {(a.value, d.value if d else None) for a in Action for d in [None, *Diagnosis]}
        made = set(SCENARIOS)
        # Guard-only kinds (terminate, spike) are walked by the guard-only test below.
        acting = {k for k in kinds if k[0] not in ("none", "terminate") and k[1] != "spike"}
        # A clear-cache decision has no diagnosis, every other acting one has one; kill only at the ceiling.
        assert made == {k for k in acting if (k[0] == "clear_cache") == (k[1] is None)
                        and (k[0] == "kill") == (k[1] == "kill_ceiling")}

    @pytest.mark.parametrize("kind", sorted(SCENARIOS, key=str), ids=lambda k: f"{k[0]}-{k[1]}")
    @pytest.mark.parametrize("ranks", [(0,), (0, 1)], ids=["plain", "gang"])
    def test_decision_kind_has_the_readme_fields(self, kind: tuple[str, str | None], ranks: tuple[int, ...]) -> None:
        scenario, policy = SCENARIOS[kind]
        [made] = decided(scenario(job(ranks, **policy)))[:1]
        assert (made.decision.action.value, made.decision.diagnosis.value if made.decision.diagnosis else None) == kind
        assert DECISION_FIELDS - {"action", "reason"} <= set(made.numbers), made.numbers
        assert not ev.RESERVED_KEYS & set(made.numbers)
        assert made.numbers["budget"] == LIMITS.budget
        if len(ranks) > 1:
            assert made.numbers["rank"] == 0

    def test_a_step_decision_names_the_workers_footprint_footprint_level(self) -> None:
        [made] = decided(leak_predicted(job()))
        assert made.numbers["footprint_level"] > 300 * MiB and "level" not in made.numbers

    def test_guard_only_decisions_have_the_fields_too(self) -> None:
        life = job(sdk=False)
        running(life)
        actions = life.handle(sample(1.0, 1010 * MiB)) + life.handle(sample(1.1, 1010 * MiB))
        actions += life.handle(sample(1.2, 1200 * MiB))
        made = decided(actions)
        assert len(made) == 2
        for decision in made:  # a guard-only life has no steps: its decisions carry no step
            assert {"sampled", "budget"} <= set(decision.numbers), decision.numbers
            assert not ev.RESERVED_KEYS & set(decision.numbers)

    @pytest.mark.parametrize("key", sorted(ev.RESERVED_KEYS))
    def test_a_field_shadowing_the_logs_keys_is_refused_where_it_is_made(self, key: str) -> None:
        made = decided(peak(job()))[0]
        with pytest.raises(ValueError, match="shadow"):
            ev.Decided(made.decision, {key: 1})
        with pytest.raises(ValueError, match="shadow"):
            ev.Note("kill", {key: 1})
        with pytest.raises(ValueError, match="shadow"):
            ev.StateChanged("RUNNING", "STOPPING", "why", {key: 1})


def notes(actions: list[ev.Action], event: str) -> list[dict[str, Any]]:
    return [a.fields for a in actions if isinstance(a, ev.Note) and a.event == event]


class TestGangRecords:
    """A gang's history tells every rank's story: its exit, and each signal with the pid it went to."""

    def test_sigterm_after_a_sigkilled_rank_names_the_survivor(self) -> None:
        life = job((0, 1))
        running(life)
        assert life.life is not None
        actions = life.handle(ev.Exited(5.0, -signal.SIGKILL, 0, 1))
        [kill] = notes(actions, "kill")
        assert kill["signal"] == "SIGTERM" and kill["pid"] == 100 and kill["rank"] == 0
        actions = life.handle(ev.Tick(8.0, 10**12, 0))  # past kill_grace: SIGKILL, again to the survivor only
        [kill] = notes(actions, "kill")
        assert kill["signal"] == "SIGKILL" and kill["pid"] == 100

    def test_a_hang_kill_names_every_rank_it_went_to(self) -> None:
        life = job((0, 1))
        running(life)
        actions = life.handle(ev.Tick(11.0, 10**12, 0))
        kills = notes(actions, "kill")
        assert [(k["rank"], k["pid"], k["signal"]) for k in kills] == [(0, 100, "SIGTERM"), (1, 101, "SIGTERM")]

    def test_every_rank_exit_is_recorded_and_the_survivors_traceback_is_expected(self) -> None:
        life = job((0, 1))
        running(life)
        life.handle(step(4, 100 * MiB, rank=0))
        actions = life.handle(ev.Exited(5.0, -signal.SIGKILL, 0, 1))
        actions += life.handle(ev.Exited(5.1, 1, 0, 0))  # "[ring] connection to a peer was lost"
        exits = notes(actions, "rank_exit")
        assert [(e["rank"], e["code"]) for e in exits] == [(1, -9), (0, 1)]
        assert exits[0]["signal"] == "SIGKILL" and exits[0]["expected"] is False and exits[0]["pid"] == 101
        assert exits[1]["expected"] is True and "rank 1 killed by signal 9" in exits[1]["cause"]
        assert exits[1]["step"] == 4
        assert len(notes(actions, "exit")) == 1  # and one record of the life's exit, as before

    def test_a_checkpointed_gang_exit_records_each_ranks_goodbye(self) -> None:
        life = job((0, 1))
        running(life)
        actions = []
        for rank in (0, 1):
            actions += life.handle(ev.GoodbyeIn(6.0, "checkpointed", 12, 12, rank))
            actions += life.handle(ev.Exited(6.1, EXIT_CHECKPOINTED, 12, rank))
        exits = notes(actions, "rank_exit")
        assert [(e["rank"], e["code"], e["goodbye"], e["goodbye_step"]) for e in exits] == [
            (0, 75, "checkpointed", 12), (1, 75, "checkpointed", 12)]
        assert not any("expected" in e for e in exits)

    def test_a_plain_job_keeps_its_one_exit_record(self) -> None:
        life = job()
        running(life)
        actions = life.handle(ev.Exited(5.0, 1, 0, 0))
        assert not notes(actions, "rank_exit") and len(notes(actions, "exit")) == 1


class TestFollowerLeaving:
    """A follower daemon that shuts down tells the leader (its last ``gang-sync`` says ``leaving``)."""

    def leader(self) -> Lifecycle:
        settings = Settings(policy=PolicyConfig(), ranks=(0,), world=2, peers=("b",), kill_grace=2.0,
                            hang_timeout=10.0)
        life = Lifecycle(settings, LIMITS)
        life.handle(ev.Start(0.0))
        life.handle(ev.PeerSync(0.1, "b", 0, 0, True, None, 0))
        assert life.life is not None
        life.handle(ev.Spawned(1, 0.1, 100, 0, 0))
        life.handle(ev.HelloIn(0.2, Hello("t", 100, "j", 0, 100, 8, 1), 0))
        return life

    def test_a_checkpointed_follower_that_leaves_ends_the_generation_and_the_gang_waits_for_it(self) -> None:
        life = self.leader()
        life.handle(ev.GoodbyeIn(1.0, "gang: a peer rank was asked", 5, 5, 0))
        life.handle(ev.Exited(1.0, EXIT_CHECKPOINTED, 5, 0))
        assert life.life is not None  # the follower's report is owed
        actions = life.handle(ev.PeerSync(1.1, "b", 1, 0, False, Outcome(1, EXIT_CHECKPOINTED, 5, None, (5,)), 5,
                                          leaving=True))
        assert notes(actions, "gang_host_shutdown")[0]["host"] == "b"
        assert life.life is None and life.stats.stop_steps == [[5, 5]]
        assert life.state == JobState.STARTING and life.deferred  # the next generation waits for host b
        assert not life.peers["b"].ready(1.2, life.settings.peer_timeout)
        life.handle(ev.PeerSync(30.0, "b", 1, 0, True, None, 5))  # its daemon is back
        assert life.life is not None and life.life.id == 2

    def test_a_follower_leaving_without_a_report_of_the_open_generation_ends_it_now(self) -> None:
        life = self.leader()
        life.handle(ev.PeerSync(0.5, "b", 0, 0, True, None, 0))  # told to run generation 1
        actions = life.handle(ev.PeerSync(0.6, "b", 0, 0, False, None, 0, leaving=True))
        assert [(k["signal"], k["pid"]) for k in notes(actions, "kill")] == [("SIGTERM", 100)]
        life.handle(ev.Exited(0.7, -signal.SIGTERM, 0, 0))
        assert life.life is None and life.state == JobState.BACKOFF  # not left waiting for host b's report


class TestGangHangShapes:
    """A gang hang names its shape: who is silent, who waits inside which collective."""

    def hang(self, waiting: dict[int, tuple[str, float]], heard: dict[int, float]) -> str:
        life = job((0, 1))
        running(life)
        for rank, at in heard.items():
            life.handle(ev.Heard(at, rank))
        for rank, (what, seconds) in waiting.items():
            life.handle(ev.Waiting(9.5, rank, what, seconds))
        actions = life.handle(ev.Tick(11.0, 10**12, 0))
        [state] = [a for a in actions if isinstance(a, ev.StateChanged)]
        assert state.new == "STOPPING"
        return state.reason

    def test_a_stopped_peer_is_silent_and_the_other_waits_in_all_sum(self) -> None:
        reason = self.hang({0: ("all_sum", 1.5)}, {0: 0.5})
        assert reason == "hung: rank 1 silent 11.0s; rank 0 waiting in all_sum for 3.0s (timeout 10.0s)"

    def test_every_rank_waiting_inside_a_collective_is_a_deadlock(self) -> None:
        reason = self.hang({0: ("all_sum", 1.5), 1: ("all_sum", 1.0)}, {})
        assert reason.startswith("hung: rank 0 waiting in all_sum for 3.0s; rank 1 waiting in all_sum for 2.5s")
        assert "every rank blocked inside a collective" in reason

    def test_waiting_is_no_sign_of_life(self) -> None:
        life = job((0, 1))
        running(life)
        life.handle(ev.Heard(9.0, 1))
        for at in (5.0, 8.0, 9.9):  # rank 0 keeps saying it waits: its silence still counts
            life.handle(ev.Waiting(at, 0, "all_sum", at - 1.0))
        actions = life.handle(ev.Tick(10.5, 10**12, 0))
        assert [k["rank"] for k in notes(actions, "kill")] == [0, 1]

    def test_a_step_clears_the_waiting_mark(self) -> None:
        life = job((0, 1))
        running(life)
        life.handle(ev.Waiting(1.0, 0, "all_sum", 1.0))
        life.handle(step(1, 100 * MiB, rank=0))
        life.handle(ev.Heard(1.0, 1))
        actions = life.handle(ev.Tick(11.5, 10**12, 0))
        [state] = [a for a in actions if isinstance(a, ev.StateChanged)]
        assert "waiting" not in state.reason and "rank 0 silent" in state.reason
