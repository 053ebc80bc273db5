"""The standby in the pure reducer (supervisor.core.standby): events in, actions out, no process or clock."""

from __future__ import annotations

import signal
from typing import Any

from protocol import Hello, Step
from protocol.messages import EXIT_CHECKPOINTED
from supervisor.core import events as ev
from supervisor.core.lifecycle import Lifecycle, Settings
from supervisor.core.policy import Limits, PolicyConfig
from supervisor.core.standby import MAX_FAILURES
from supervisor.core.states import JobState

MiB = 2**20
LIMITS = Limits(850 * MiB, 1000 * MiB, 1100 * MiB)
FLOOR = {"available": 8 << 30, "floor": 0}


class Driver:
    """One Lifecycle and a clock; each call feeds one event and keeps the actions it returned."""

    def __init__(self, **settings: Any) -> None:
        self.lc = Lifecycle(Settings(policy=PolicyConfig(), **{"standby": "auto", **settings}), LIMITS)
        self.now = 0.0
        self.actions: list[ev.Action] = []
        self.step_no = 0

    def feed(self, event: ev.Event) -> list[ev.Action]:
        out = self.lc.handle(event)
        self.actions += out
        return out

    def start(self, features: str = "census standby") -> None:
        self.feed(ev.Start(self.now))
        life = self.lc.life
        assert life is not None
        self.feed(ev.Spawned(life.id, self.now, 100 + life.id, 0))
        self.feed(ev.HelloIn(self.now, Hello("t", 100 + life.id, "j", self.step_no, 1000, 8, 1, 2, features)))

    def step(self, footprint: int) -> list[ev.Action]:
        self.now += 0.1
        self.step_no += 1
        return self.feed(ev.StepIn(self.now, Step(self.step_no, 8, 1, 1.0, 0.1, footprint, 0, footprint, footprint)))

    def leak(self, steps: int, start: int = 200 * MiB, per_step: int = 4 * MiB) -> None:
        for i in range(steps):
            self.step(start + i * per_step)

    def sample(self, current: int | None, standby: int | None = None, **kw: Any) -> list[ev.Action]:
        self.now += 0.05
        return self.feed(ev.Sample(self.now, current, True, kw.pop("departing", {}), **{**FLOOR, **kw},
                                   standby=standby))

    def spawned_standby(self) -> ev.SpawnStandby:
        found = [a for a in self.actions if isinstance(a, ev.SpawnStandby)]
        assert found, "no standby was started"
        return found[-1]

    def notes(self, name: str) -> list[ev.Note]:
        return [a for a in self.actions if isinstance(a, ev.Note) and a.event == name]

    def ready_standby(self) -> int:
        """A leaking life with a standby that said standby; returns the standby's life id."""
        self.start()
        self.leak(8)
        self.sample(230 * MiB)
        sb = self.spawned_standby()
        self.feed(ev.StandbySpawned(sb.life, self.now, 900))
        self.feed(ev.StandbyIn(sb.life, self.now))
        return sb.life

    def recycle(self, standby: int = 40 * MiB) -> None:
        """Leak (sampled, with the standby beside it) until the policy asks for a checkpoint-and-exit; then the
        worker checkpoints and says goodbye."""
        footprint = 230 * MiB
        for _ in range(400):
            footprint += 4 * MiB
            asked = [a for a in self.step(footprint) if isinstance(a, ev.Send) and a.action == "checkpoint_exit"]
            self.sample(footprint, standby=standby)
            if asked:
                break
        assert self.lc.state == JobState.CHECKPOINTING and self.lc.life is not None
        old = self.lc.life.id
        self.feed(ev.GoodbyeIn(self.now, "leak", self.step_no, self.step_no))
        self.feed(ev.DepartedExited(self.now, old, EXIT_CHECKPOINTED))  # (its memory made the successor wait)


def signals_to(actions: list[ev.Action], life: int) -> list[int]:
    return [a.signum for a in actions if isinstance(a, ev.Signal) and a.life == life]


class TestWhen:
    """A standby is started for a leaking SDK life whose hello lists the feature, and only then."""

    def test_a_leaking_life_that_fits_gets_one_standby(self) -> None:
        d = Driver()
        d.start()
        d.leak(8)
        assert not any(isinstance(a, ev.SpawnStandby) for a in d.actions)  # no sample of the life yet
        d.sample(230 * MiB)
        sb = d.spawned_standby()
        assert (sb.batch, sb.accum) == (8, 1) and sb.life != d.lc.life.id  # type: ignore[union-attr]
        d.sample(230 * MiB, standby=30 * MiB)
        d.sample(230 * MiB, standby=30 * MiB)
        assert sum(isinstance(a, ev.SpawnStandby) for a in d.actions) == 1  # at most one

    def test_none_without_the_feature_in_the_hello(self) -> None:
        d = Driver()
        d.start(features="census")
        d.leak(8)
        d.sample(230 * MiB)
        assert not any(isinstance(a, ev.SpawnStandby) for a in d.actions)

    def test_none_when_off_or_for_a_gang(self) -> None:
        for settings in ({"standby": "off"}, {"ranks": (0,), "world": 2}):
            d = Driver(**settings)
            d.start()
            d.leak(8)
            d.sample(230 * MiB)
            assert not any(isinstance(a, ev.SpawnStandby) for a in d.actions), settings

    def test_none_for_a_guard_only_life(self) -> None:
        d = Driver(sdk="auto")
        d.feed(ev.Start(d.now))
        life = d.lc.life
        assert life is not None
        d.feed(ev.Spawned(life.id, d.now, 101, 0))
        for _ in range(20):
            d.sample(230 * MiB)
        assert d.lc.guard_only and not any(isinstance(a, ev.SpawnStandby) for a in d.actions)

    def test_none_for_a_life_that_neither_leaks_nor_restarted(self) -> None:
        d = Driver()
        d.start()
        for _ in range(10):
            d.step(200 * MiB)
        d.sample(200 * MiB)
        assert not any(isinstance(a, ev.SpawnStandby) for a in d.actions)

    def test_none_when_it_would_not_fit_under_warn_with_the_margin(self) -> None:
        d = Driver(standby_estimate=100 * MiB)
        d.start()
        d.leak(8, start=700 * MiB)
        d.sample(760 * MiB)  # 760 + margin + 100 > 850
        assert not any(isinstance(a, ev.SpawnStandby) for a in d.actions)


class TestMemory:
    """A standby's memory counts in the job's total, and it is the first thing to go near the budget."""

    def test_its_bytes_count_in_the_total_and_lower_the_life_bands(self) -> None:
        d = Driver()
        d.ready_standby()
        d.sample(300 * MiB, standby=40 * MiB)
        assert d.lc.last_sampled == 340 * MiB
        assert d.lc.life_limits() == Limits(810 * MiB, 960 * MiB, 1060 * MiB)
        assert d.lc.stats.standby_max_bytes == 40 * MiB

    def test_killed_at_once_when_the_total_reaches_the_budget_and_counted_until_reaped(self) -> None:
        d = Driver()
        sb = d.ready_standby()
        out = d.sample(970 * MiB, standby=40 * MiB)
        assert signals_to(out, sb) == [signal.SIGKILL]
        life = d.lc.life
        assert life is not None and not signals_to(out, life.id)  # the life is not touched by it
        assert d.lc.state == JobState.RUNNING
        d.sample(300 * MiB, standby=40 * MiB)
        assert d.lc.last_sampled == 340 * MiB  # still counted: not reaped yet
        d.leak(3, start=300 * MiB)
        d.sample(300 * MiB, standby=40 * MiB)
        assert sum(isinstance(a, ev.SpawnStandby) for a in d.actions) == 1  # no second one before the reaping
        d.feed(ev.StandbyExited(sb, d.now, -9))
        assert d.lc.standby is None and not d.notes("standby_exit")  # asked for: no failure

    def test_killed_when_available_memory_is_under_the_floor(self) -> None:
        d = Driver()
        sb = d.ready_standby()
        out = d.sample(300 * MiB, standby=40 * MiB, available=100 * MiB, floor=200 * MiB)
        assert signals_to(out, sb) == [signal.SIGKILL]


class TestGo:
    """At the recycle the waiting standby becomes the life: a go, not a spawn."""

    def test_the_recycle_goes_to_the_standby(self) -> None:
        d = Driver()
        sb = d.ready_standby()
        d.recycle()
        goes = [a for a in d.actions if isinstance(a, ev.Go)]
        assert [(g.life, g.batch, g.accum) for g in goes] == [(sb, 8, 1)]
        assert sum(isinstance(a, ev.Spawn) for a in d.actions) == 1  # only the first life was spawned
        life = d.lc.life
        assert life is not None and life.id == sb and d.lc.standby is None
        d.feed(ev.Spawned(sb, d.now, 900, d.step_no))
        d.feed(ev.HelloIn(d.now, Hello("t", 900, "j", d.step_no, 1000, 8, 1, 2, "census standby")))
        assert d.lc.state == JobState.RUNNING and d.lc.stats.standbys_used == 1

    def test_the_leak_recycles_before_the_total_with_the_standby_reaches_the_budget(self) -> None:
        d = Driver()
        sb = d.ready_standby()
        d.recycle(standby=40 * MiB)
        assert not signals_to(d.actions, sb)  # never killed on the way: the life's bands were lowered by it
        assert d.lc.stats.samples_over_budget == 0 and d.lc.stats.max_sampled < LIMITS.budget
        assert any(isinstance(a, ev.Go) and a.life == sb for a in d.actions)

    def test_a_changed_batch_dismisses_it_and_spawns_fresh(self) -> None:
        d = Driver()
        sb = d.ready_standby()
        d.lc.batch, d.lc.accum = 4, 2  # (what a shrink decision leaves for the next life)
        life = d.lc.life
        assert life is not None
        d.feed(ev.GoodbyeIn(d.now, "stop", d.step_no, d.step_no))  # (not requested: no overlap)
        d.feed(ev.Exited(d.now, EXIT_CHECKPOINTED, d.step_no))
        out = d.actions
        assert signals_to(out, sb) == [signal.SIGKILL]
        assert not any(isinstance(a, ev.Go) for a in out)
        assert [a.batch for a in out if isinstance(a, ev.Spawn)][-1] == 4

    def test_a_stop_dismisses_it(self) -> None:
        d = Driver()
        sb = d.ready_standby()
        out = d.feed(ev.Stop(d.now))
        assert signals_to(out, sb) == [signal.SIGKILL]


class TestReplaced:
    """A standby that dies or hangs is replaced later, without touching the running life."""

    def test_a_dead_standby_is_replaced_after_a_delay(self) -> None:
        d = Driver()
        sb = d.ready_standby()
        out = d.feed(ev.StandbyExited(sb, d.now, 1))
        assert d.notes("standby_exit") and d.lc.state == JobState.RUNNING
        assert not any(isinstance(a, ev.Signal | ev.Send) for a in out)
        d.sample(240 * MiB)
        assert sum(isinstance(a, ev.SpawnStandby) for a in d.actions) == 1  # not at once
        d.now += 1.5
        d.sample(240 * MiB)
        assert sum(isinstance(a, ev.SpawnStandby) for a in d.actions) == 2

    def test_a_hung_standby_is_killed_and_after_three_the_job_gets_none(self) -> None:
        d = Driver(startup_timeout=5.0)
        d.start()
        d.leak(8)
        for failure in range(MAX_FAILURES):
            d.now += 5.0  # past the delay before the next standby
            d.feed(ev.Heard(d.now))  # the life itself is well
            d.sample(230 * MiB)
            sb = d.spawned_standby()
            d.feed(ev.StandbySpawned(sb.life, d.now, 900 + failure))
            d.now += 5.5
            d.feed(ev.Heard(d.now))
            out = d.feed(ev.Tick(d.now, 8 << 30, 0))
            assert signals_to(out, sb.life) == [signal.SIGKILL], failure
            d.feed(ev.StandbyExited(sb.life, d.now, -9))
            assert d.lc.state == JobState.RUNNING
        assert d.notes("standby_disabled")
        d.now += 40.0
        d.feed(ev.Heard(d.now))
        d.sample(230 * MiB)
        assert sum(isinstance(a, ev.SpawnStandby) for a in d.actions) == MAX_FAILURES

    def test_a_hello_with_its_token_before_go_dismisses_it(self) -> None:
        d = Driver()
        sb = d.ready_standby()
        out = d.feed(ev.StandbyFailed(sb, d.now, "hello before its go"))
        assert signals_to(out, sb) == [signal.SIGKILL]
        life = d.lc.life
        assert life is not None and d.lc.state == JobState.RUNNING and not signals_to(out, life.id)
