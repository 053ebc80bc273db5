"""The decisions of a guard-only life (supervisor.core.guard), table-driven: samples in, a decision in its own
words out (leak or spike per second; SIGTERM or SIGKILL; never a batch or a checkpoint)."""

from __future__ import annotations

import math

import pytest

from supervisor.core.guard import SampleTrend, guard_numbers, guard_on_sample
from supervisor.core.policy import Action, Diagnosis, Limits, PolicyConfig

MiB = 2**20
LIMITS = Limits(warn=850 * MiB, budget=1000 * MiB, kill=1100 * MiB)
CONFIG = PolicyConfig(leak_rate=1 * MiB)


def trend_of(levels: list[int], every: float = 0.25) -> SampleTrend:
    trend = SampleTrend()
    for i, level in enumerate(levels):
        trend.add(100.0 + i * every, level)
    return trend


STEADY_LEAK = [100 * MiB + i * 50 * MiB for i in range(19)]  # 200 MiB/s at 4 Hz, 1000 MiB at the last sample
FLAT_THEN_JUMP = [200 * MiB] * 18 + [1010 * MiB]  # a one-off allocation
NOISY_FLAT = [200 * MiB + (i % 3) * MiB for i in range(30)] + [1020 * MiB]


class TestDiagnosis:
    """Over the budget on consecutive samples: a leak when the samples grow faster than leak_rate, else a spike."""

    @pytest.mark.parametrize(("levels", "sampled", "diagnosis"), [
        (STEADY_LEAK, 1000 * MiB, Diagnosis.LEAK),
        (FLAT_THEN_JUMP, 1010 * MiB, Diagnosis.SPIKE),
        (NOISY_FLAT, 1020 * MiB, Diagnosis.SPIKE),
    ])
    def test_second_sample_over_budget_terminates_with_the_diagnosis(self, levels: list[int], sampled: int,
                                                                      diagnosis: Diagnosis) -> None:
        trend = trend_of(levels)
        first, count = guard_on_sample(sampled, True, 0, LIMITS, trend, CONFIG, 105.0)
        assert not first.acts and count == 1
        decision, count = guard_on_sample(sampled, True, count, LIMITS, trend, CONFIG, 105.0)
        assert decision.action is Action.TERMINATE and decision.diagnosis is diagnosis
        assert (decision.next_batch, decision.next_accum) == (0, 0)
        assert "batch" not in decision.reason and "checkpoint" not in decision.reason

    def test_a_leak_says_its_rate_and_the_time_a_fresh_start_takes_to_the_budget(self) -> None:
        trend = trend_of(STEADY_LEAK)
        _, count = guard_on_sample(1000 * MiB, True, 0, LIMITS, trend, CONFIG, 104.5)
        decision, _ = guard_on_sample(1000 * MiB, True, count, LIMITS, trend, CONFIG, 104.5)
        assert decision.reason.startswith("leak 200.0 MiB/s over 4.5 s of samples")
        assert "from 100.0 MiB the budget 1000.0 MiB is reached in 4.5 s" in decision.reason

    def test_the_leak_rate_is_the_threshold(self) -> None:
        trend = trend_of(STEADY_LEAK)
        slow = PolicyConfig(leak_rate=300 * MiB)
        decision, _ = guard_on_sample(1000 * MiB, True, 1, LIMITS, trend, slow, 104.5)
        assert decision.diagnosis is Diagnosis.SPIKE and "threshold 300.0 MiB/s" in decision.reason


class TestBands:
    """Which sample draws which action."""

    @pytest.mark.parametrize(("sampled", "complete", "over", "action", "count"), [
        (500 * MiB, True, 0, Action.NONE, 0),
        (900 * MiB, True, 0, Action.NONE, 0),  # the warn band asks nothing of a worker that does not listen
        (1000 * MiB, True, 0, Action.NONE, 1),  # the first sample at the budget waits for a second
        (1050 * MiB, False, 1, Action.NONE, 1),  # a partial sample under the ceiling never acts
        (900 * MiB, True, 1, Action.NONE, 0),  # back under: the count starts over
        (1100 * MiB, True, 0, Action.KILL, 0),  # the ceiling: SIGKILL at once
        (1200 * MiB, False, 0, Action.KILL, 0),  # even partial (it only under-counts)
    ])
    def test_band(self, sampled: int, complete: bool, over: int, action: Action, count: int) -> None:
        decision, after = guard_on_sample(sampled, complete, over, LIMITS, trend_of(STEADY_LEAK), CONFIG, 105.0)
        assert decision.action is action and after == count
        if action is Action.KILL:
            assert decision.diagnosis is Diagnosis.KILL_CEILING and decision.next_batch == 0
            assert "kill ceiling" in decision.reason and "leak 200.0 MiB/s" in decision.reason


class TestTrend:
    """Growth per second from samples, and the predicted crossing."""

    def test_rate_is_bytes_per_second_whatever_the_sampling_interval(self) -> None:
        for every in (0.05, 0.25, 1.0):
            levels = [int(i * every * 10 * MiB) for i in range(40)]
            assert trend_of(levels, every).rate == pytest.approx(10 * MiB, rel=1e-3)

    def test_dense_samples_near_the_budget_do_not_outweigh_the_flat_life_before(self) -> None:
        trend = trend_of([200 * MiB] * 12)  # 3 s flat at 4 Hz
        for i in range(20):  # then a 1 s climb sampled at 20 Hz
            trend.add(103.0 + i * 0.05, 200 * MiB + i * 40 * MiB)
        assert trend.rate == 0

    def test_fewer_than_four_samples_grow_at_zero(self) -> None:
        assert trend_of([1, 100 * MiB, 200 * MiB]).rate == 0

    def test_numbers_predict_when_the_budget_is_crossed(self) -> None:
        trend = trend_of([100 * MiB + i * 50 * MiB for i in range(9)])  # 200 MiB/s, last 500 MiB
        numbers = guard_numbers(trend, LIMITS, 500 * MiB, 102.0)
        assert numbers == {"growth_bytes_per_second": 200 * MiB, "sampled_seconds": 2.0, "budget_in_seconds": 2.5}

    def test_not_growing_predicts_no_crossing(self) -> None:
        numbers = guard_numbers(trend_of([300 * MiB] * 10), LIMITS, 300 * MiB, 103.0)
        assert numbers["budget_in_seconds"] is None and numbers["growth_bytes_per_second"] == 0
        assert math.isinf(trend_of([300 * MiB] * 10).seconds_to(300 * MiB, LIMITS.budget))
