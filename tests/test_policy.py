"""The policy as pure functions, driven by synthetic traces (no processes, no clock)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor.core.policy import (
    Action,
    Diagnosis,
    Estimator,
    Limits,
    PolicyConfig,
    SlidingTheilSen,
    backoff_delay,
    on_sample,
    on_step,
    regrow,
    sample_gap,
    shrink,
    theil_sen,
)

MiB = 1024 * 1024
GiB = 1024 * MiB
LIMITS = Limits(warn=int(1.7 * GiB), budget=2 * GiB, kill=int(2.2 * GiB))
CONFIG = PolicyConfig(max_batch=8)


def feed(levels: list[int], peaks: list[int] | None = None, config: PolicyConfig = CONFIG) -> Estimator:
    est = Estimator(config)
    for step, level in enumerate(levels, 1):
        if peaks:
            est.observe_sample(peaks[step - 1])
        est.observe_step(step, level)
    return est


def trace(kind: str, steps: int = 30, seed: int = 0) -> tuple[list[int], list[int]]:
    """End-of-step levels and in-step peaks for a named memory pattern."""
    rng = random.Random(seed)
    base = 400 * MiB
    levels, peaks = [], []
    for s in range(steps):
        level = base
        transient = 0
        if kind in ("leak", "leak+peak"):
            level += 50 * MiB * s
        if kind in ("peak", "leak+peak"):
            transient = 600 * MiB
        if kind == "noisy":
            level += rng.randint(-30, 30) * MiB
        if kind == "jump":
            level += (300 * MiB if s >= steps // 2 else 0)
        levels.append(level)
        peaks.append(level + transient)
    return levels, peaks


class TestEstimator:
    """Slope, baseline and transient from synthetic traces."""

    @pytest.mark.parametrize(
        ("kind", "low", "high"),
        [("leak", 45, 55), ("leak+peak", 45, 55), ("peak", -0.5, 0.5), ("noisy", -3, 3), ("jump", -0.5, 0.5)],
    )
    def test_slope(self, kind: str, low: float, high: float) -> None:
        levels, peaks = trace(kind)
        slope = feed(levels, peaks).slope / MiB
        assert low <= slope <= high

    def test_transient_is_the_in_step_excursion(self) -> None:
        levels, peaks = trace("peak")
        assert feed(levels, peaks).transient == 600 * MiB

    def test_warmup_steps_are_ignored(self) -> None:
        est = feed([5 * GiB, 3 * GiB, 100 * MiB] + [400 * MiB] * 10)
        assert est.baseline == 400 * MiB and est.slope == 0

    def test_no_slope_before_four_points(self) -> None:
        assert feed([1, 2 * GiB, 4 * GiB, 6 * GiB, 8 * GiB]).slope == 0


class TestOnSample:
    """Escalation bands on a single sample."""

    @pytest.mark.parametrize(
        ("sampled", "over_before", "action", "over_after"),
        [
            (1 * GiB, 0, Action.NONE, 0),
            (int(1.8 * GiB), 0, Action.CLEAR_CACHE, 0),
            (2 * GiB, 0, Action.NONE, 1),  # one sample at budget: wait for a second
            (2 * GiB, 1, Action.CHECKPOINT_EXIT, 2),
            (int(2.3 * GiB), 0, Action.KILL, 0),  # over the kill ceiling: at once
            (1 * GiB, 1, Action.NONE, 0),  # back under: the count resets
        ],
    )
    def test_bands(self, sampled: int, over_before: int, action: Action, over_after: int) -> None:
        decision, over = on_sample(sampled, True, over_before, LIMITS, Estimator(CONFIG), 8, 1, CONFIG)
        assert (decision.action, over) == (action, over_after)

    def test_incomplete_sample_under_the_kill_ceiling_never_acts(self) -> None:
        decision, over = on_sample(LIMITS.kill - 1, False, 5, LIMITS, Estimator(CONFIG), 8, 1, CONFIG)
        assert decision.action is Action.NONE and over == 5

    def test_incomplete_sample_over_the_kill_ceiling_kills(self) -> None:
        decision, _ = on_sample(10 * GiB, False, 5, LIMITS, Estimator(CONFIG), 8, 1, CONFIG)
        assert decision.action is Action.KILL and decision.diagnosis is Diagnosis.KILL_CEILING


class TestDiagnosis:
    """A breach is a leak (recycle, same batch) or a peak (shrink, same effective batch)."""

    @pytest.mark.parametrize(
        ("kind", "diagnosis", "batch"),
        [("leak", Diagnosis.LEAK, (8, 1)), ("peak", Diagnosis.PEAK, (4, 2)), ("noisy", Diagnosis.PEAK, (4, 2)),
         ("jump", Diagnosis.PEAK, (4, 2)), ("leak+peak", Diagnosis.LEAK, (8, 1))],
    )
    def test_breach(self, kind: str, diagnosis: Diagnosis, batch: tuple[int, int]) -> None:
        levels, peaks = trace(kind)
        decision, _ = on_sample(2 * GiB, True, 1, LIMITS, feed(levels, peaks), 8, 1, CONFIG)
        assert decision.diagnosis is diagnosis
        assert (decision.next_batch, decision.next_accum) == batch

    def test_leak_in_a_short_life_shrinks_as_well(self) -> None:
        levels, _ = trace("leak", steps=8)
        decision, _ = on_sample(2 * GiB, True, 1, LIMITS, feed(levels), 8, 1, CONFIG)
        assert decision.diagnosis is Diagnosis.PEAK and decision.next_batch == 4

    def test_shrink_only_policy_always_shrinks(self) -> None:
        config = PolicyConfig(max_batch=8, adaptive=False)
        levels, _ = trace("leak")
        decision, _ = on_sample(2 * GiB, True, 1, LIMITS, feed(levels, config=config), 8, 1, config)
        assert decision.next_batch == 4


class TestOnStep:
    """Predictive recycle before a leak breach, and regrowth after a peak has gone."""

    def test_predicts_leak_breach_and_recycles_at_same_batch(self) -> None:
        levels = [400 * MiB + 50 * MiB * s for s in range(34)]  # reaches 2 GiB at step ~33
        est = feed(levels)
        decision = on_step(est, LIMITS, 8, 1, 10, CONFIG)
        assert decision.diagnosis is Diagnosis.LEAK_PREDICTED
        assert (decision.next_batch, decision.next_accum) == (8, 1)

    def test_no_prediction_far_from_budget(self) -> None:
        est = feed([400 * MiB + 50 * MiB * s for s in range(10)])
        assert on_step(est, LIMITS, 8, 1, 10, CONFIG).action is Action.NONE

    @staticmethod
    def first_recycle(seconds: list[float]) -> int:
        """The step a 50 MiB/step leak from 400 MiB is recycled at, with the worker's step times."""
        est = Estimator(CONFIG)
        for step in range(1, 60):
            est.observe_step(step, 400 * MiB + 50 * MiB * step, 0, seconds[step % len(seconds)])
            if on_step(est, LIMITS, 8, 1, step, CONFIG).diagnosis is Diagnosis.LEAK_PREDICTED:
                return step
        raise AssertionError("never recycled")

    def test_steps_slower_than_the_daemon_reacts_leave_one_step_for_the_command(self) -> None:
        # 2 GiB at step 32.96; the checkpoint needs 2 steps and the command lands 1 late: recycle at step 30.
        assert self.first_recycle([1.0]) == self.first_recycle([0.0]) == 30

    def test_steps_faster_than_the_daemon_reacts_recycle_earlier_by_the_steps_a_reaction_takes(self) -> None:
        # 25 ms steps: a 0.1 s reaction lands the command 4 steps late, so the recycle comes 3 steps earlier.
        assert CONFIG.reaction_seconds == 0.1
        assert self.first_recycle([0.025]) == 27

    def test_the_step_time_is_the_median_so_one_slow_step_does_not_widen_the_margin(self) -> None:
        assert self.first_recycle([0.025] * 9 + [5.0]) == 27
        assert self.first_recycle([1.0] * 9 + [0.001]) == 30

    def test_regrows_when_projected_peak_fits(self) -> None:
        est = feed([400 * MiB] * 20, [420 * MiB] * 20)
        decision = on_step(est, LIMITS, 2, 4, CONFIG.regrow_after_steps, CONFIG)
        assert decision.diagnosis is Diagnosis.REGROW and (decision.next_batch, decision.next_accum) == (4, 2)

    def test_no_regrowth_while_the_peak_would_not_fit(self) -> None:
        est = feed([400 * MiB] * 20, [1400 * MiB] * 20)  # 1000 MiB transient at batch 4: 2 GiB+ at 8
        assert on_step(est, LIMITS, 4, 2, 1000, CONFIG).action is Action.NONE

    def test_no_regrowth_before_enough_healthy_steps(self) -> None:
        est = feed([400 * MiB] * 20)
        assert on_step(est, LIMITS, 4, 2, CONFIG.regrow_after_steps - 1, CONFIG).action is Action.NONE


class TestBatchArithmetic:
    """Shrink and regrow keep batch x accum exact."""

    @pytest.mark.parametrize(
        ("batch", "accum", "expected"),
        [(8, 1, (4, 2)), (4, 2, (2, 4)), (1, 8, (1, 8)), (6, 1, (3, 2)), (5, 1, (1, 5)), (12, 1, (6, 2))],
    )
    def test_shrink(self, batch: int, accum: int, expected: tuple[int, int]) -> None:
        assert shrink(batch, accum, PolicyConfig(max_batch=batch)) == expected

    def test_shrink_respects_min_batch(self) -> None:
        assert shrink(4, 1, PolicyConfig(min_batch=4)) == (4, 1)

    @pytest.mark.parametrize(("batch", "accum", "expected"), [(2, 4, (4, 2)), (4, 2, (8, 1)), (8, 1, (8, 1))])
    def test_regrow(self, batch: int, accum: int, expected: tuple[int, int]) -> None:
        assert regrow(batch, accum, PolicyConfig(max_batch=8)) == expected

    def test_backoff_doubles_up_to_the_maximum(self) -> None:
        assert [backoff_delay(n, 1.0, 5.0) for n in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]


class TestShortLives:
    """A predicted leak breach in a life shorter than min_steps_per_life shrinks as well."""

    def test_short_life_prediction_shrinks(self) -> None:
        levels = [1500 * MiB + 50 * MiB * s for s in range(9)]  # 9 steps: a short life
        decision = on_step(feed(levels), LIMITS, 8, 1, 5, CONFIG)
        assert decision.diagnosis is Diagnosis.LEAK_PREDICTED and (decision.next_batch, decision.next_accum) == (4, 2)


class TestSlidingTheilSen:
    """The incremental slope equals the recomputed Theil-Sen slope exactly, point after point."""

    @settings(max_examples=300, deadline=None)
    @given(window=st.integers(1, 30),
           points=st.lists(st.tuples(st.integers(-50, 400), st.integers(-(2**40), 2**40)), max_size=120))
    def test_equals_the_full_recomputation_after_every_point(self, window: int, points: list[tuple[int, int]]) -> None:
        trend = SlidingTheilSen(window)
        for step, level in points:
            trend.add(step, level)
            assert trend.slope == theil_sen(list(trend.points))

    @settings(max_examples=100, deadline=None)
    @given(levels=st.lists(st.integers(0, 2**36), max_size=80), warmup=st.integers(0, 5))
    def test_estimator_slope_is_theil_sen_of_its_window(self, levels: list[int], warmup: int) -> None:
        config = PolicyConfig(warmup_steps=warmup)
        est = Estimator(config)
        for step, level in enumerate(levels, 1):
            est.observe_step(step, level)
            window = [(s, lv) for s, lv in enumerate(levels[:step], 1)][warmup:][-config.window:]
            assert list(est.levels) == window
            assert est.slope == theil_sen(window)

    def test_a_leak_under_noise_and_an_outlier_keeps_its_slope(self) -> None:
        trend = SlidingTheilSen(24)
        rng = random.Random(1)
        for step in range(1, 200):
            level = 400 * MiB + 50 * MiB * step + rng.randint(-5, 5) * MiB
            trend.add(step, level if step != 150 else level - 900 * MiB)  # a cache clear
        assert trend.slope == pytest.approx(50 * MiB, rel=0.05)


class TestSampleGap:
    """The gap to the next footprint sample: whole intervals in which growth at the rate cannot reach the
    budget, between one interval and the longest gap."""

    @pytest.mark.parametrize(("headroom", "expected"), [
        (0, 0.05), (-GiB, 0.05),  # at or over the budget: every interval
        (GiB // 2, 0.05),  # 0.5 GiB at 16 GiB/s is 31 ms: less than one interval, still one
        (2 * GiB, 0.1),  # 125 ms: two whole intervals
        (3 * GiB + GiB // 5, 0.2),  # 200 ms exactly: four
        (64 * GiB, 0.25),  # 4 s: capped at the longest gap
    ])
    def test_whole_intervals_the_growth_cannot_cross(self, headroom: int, expected: float) -> None:
        assert sample_gap(headroom, 0.05, 0.25, 16 * GiB) == pytest.approx(expected)

    def test_longest_equal_to_the_interval_disables_it(self) -> None:
        assert sample_gap(64 * GiB, 0.05, 0.05, 16 * GiB) == 0.05

    @settings(max_examples=200, deadline=None)
    @given(st.integers(0, 2**40), st.floats(0.001, 1), st.floats(0.001, 5), st.integers(1, 2**40))
    def test_a_worker_within_the_growth_rate_cannot_cross_its_budget_before_the_next_sample(
            self, headroom: int, interval: float, longest: float, growth: int) -> None:
        gap = sample_gap(headroom, interval, longest, growth)
        assert interval * (1 - 1e-9) <= gap <= max(interval, longest) * (1 + 1e-9)
        assert gap <= interval * (1 + 1e-9) or growth * gap <= headroom * (1 + 1e-6)


class TestObserveSteps:
    """A ``steps`` frame observed in bulk equals its rows observed one by one, except two things: the slope window
    takes only the frame's last row, and a sample taken while the rows ran counts against the last row's level
    as well as the first's (when it was taken is unknown: both is the cautious reading)."""

    @settings(max_examples=200, deadline=None)
    @given(rows=st.lists(st.tuples(st.integers(0, 2**34), st.integers(0, 2**30), st.floats(0, 2)), min_size=1,
                         max_size=60),
           before=st.integers(0, 40), sampled=st.integers(0, 2**35), warmup=st.integers(0, 5))
    def test_counters_windows_and_baseline_equal_one_by_one(self, rows: list[tuple[int, int, float]], before: int,
                                                            sampled: int, warmup: int) -> None:
        config = PolicyConfig(warmup_steps=warmup)
        bulk, one = Estimator(config), Estimator(config)
        for step in range(1, before + 1):
            for est in (bulk, one):
                est.observe_step(step, 100 * MiB + step, 0, 0.5)
        steps = list(range(before + 1, before + 1 + len(rows)))
        levels, reported, seconds = ([r[i] for r in rows] for i in range(3))
        for est in (bulk, one):
            est.observe_sample(sampled)
        peak = bulk.step_peak
        bulk.observe_steps(steps, levels, reported, seconds)
        for step, level, transient, took in zip(steps, levels, reported, seconds, strict=True):
            one.observe_step(step, level, transient, took)
        assert bulk.steps_seen == one.steps_seen and bulk.baseline == one.baseline
        assert bulk.step_peak == one.step_peak and list(bulk.durations) == list(one.durations)
        expected = list(one.transients)
        if before >= warmup:  # a frame across the warm-up is taken row by row: exactly one by one
            expected[-1] = max(expected[-1], peak - levels[-1])
            assert list(bulk.levels)[-1:] == [(steps[-1], levels[-1])]
            prior = [(step, 100 * MiB + step) for step in range(1, before + 1)][warmup:]
            assert list(bulk.levels)[:-1] == prior[-(config.window - 1):]
        assert list(bulk.transients) == expected

    def test_a_leak_held_in_frames_keeps_its_slope(self) -> None:
        est = Estimator(PolicyConfig())
        for first in range(1, 400, 10):  # frames of 10 rows, 50 MiB/step
            steps = list(range(first, first + 10))
            est.observe_steps(steps, [400 * MiB + 50 * MiB * s for s in steps], [0] * 10, [0.02] * 10)
        assert est.slope == pytest.approx(50 * MiB) and est.steps_seen == 400
        assert len(est.levels) == PolicyConfig().window  # one point per frame
