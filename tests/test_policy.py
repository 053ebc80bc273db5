"""The policy as pure functions, driven by synthetic traces (no processes, no clock)."""

from __future__ import annotations

import random

import pytest

from supervisor.core.policy import (
    Action,
    Diagnosis,
    Estimator,
    Limits,
    PolicyConfig,
    backoff_delay,
    on_sample,
    on_step,
    regrow,
    shrink,
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
