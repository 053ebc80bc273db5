"""The leak forensics as pure functions: thinned Theil-Sen with its interval, the verdicts, the cache-clear test,
and a job's diagnosis over lives (bounded)."""

from __future__ import annotations

import random

import pytest

from supervisor.core.clears import CacheClears
from supervisor.core.diagnosis import JobDiagnosis
from supervisor.core.forensics import LifeForensics, judge
from supervisor.core.policy import theil_sen
from supervisor.core.trend import Fit, ThinnedTrend, theil_sen_fit

MiB = 2**20


def life_of(active: float, cache: float, outside: float, steps: int = 200, noise: int = MiB,
            measured: bool = True) -> LifeForensics:
    rng = random.Random(7)
    life = LifeForensics(1, 0.0, MiB)
    for step in range(1, steps + 1):
        a = int(100 * MiB + active * step + rng.randint(0, noise))
        c = int(5 * MiB + cache * step)
        o = int(300 * MiB + outside * step + rng.randint(0, noise))
        life.observe_step(step, a + c + o, a if measured else None, c if measured else None)
    return life


class TestTrend:
    """Thinned points keep the whole life in at most 2*keep points; the fit is Theil-Sen's."""

    def test_points_stay_bounded_and_the_stride_doubles(self) -> None:
        trend = ThinnedTrend(1.0, keep=8)
        for x in range(10_000):
            trend.add(x, 3 * x)
        assert len(trend.points) < 16
        assert trend.stride >= 512
        assert trend.points[-1][0] >= 10_000 - trend.stride
        fit = trend.fit()
        assert fit is not None and fit.slope == 3.0 and fit.low == fit.high == 3.0

    def test_the_median_is_the_policys_theil_sen(self) -> None:
        rng = random.Random(1)
        points = [(x, 5 * x + rng.randint(-50, 50)) for x in range(30)]
        fit = theil_sen_fit([(float(x), y) for x, y in points])
        assert fit is not None and fit.slope == pytest.approx(theil_sen(points))
        assert fit.low < fit.slope < fit.high

    def test_the_interval_narrows_with_more_points(self) -> None:
        rng = random.Random(2)
        widths = []
        for n in (8, 60):
            fit = theil_sen_fit([(float(x), 5 * x + rng.randint(-50, 50)) for x in range(n)])
            assert fit is not None
            widths.append(fit.high - fit.low)
        assert widths[1] < widths[0]

    def test_under_four_points_there_is_no_fit(self) -> None:
        assert theil_sen_fit([(0.0, 0), (1.0, 1), (2.0, 2)]) is None


class TestVerdicts:
    """Which series grows names the verdict; an unmeasured counter is never a zero."""

    @pytest.mark.parametrize(("active", "cache", "outside", "verdict"), [
        (40 * MiB, 0, 0, "arrays_retained"),
        (0, 20 * MiB, 0, "cache_growth"),
        (0, 0, 10 * MiB, "outside_mlx"),
        (10 * MiB, 10 * MiB, 0, "mixed"),
        (0, 0, 0, "none"),
        (0.1 * MiB, 0, 0, "none"),
    ])
    def test_each_shape(self, active: float, cache: float, outside: float, verdict: str) -> None:
        entry = life_of(active, cache, outside).entry()
        assert entry["verdict"] == verdict, entry
        assert entry["meaning"]
        assert bool(entry["fixes"]) is (verdict != "none")

    def test_the_slope_and_its_interval_are_per_step(self) -> None:
        entry = life_of(40 * MiB, 0, 0).entry()
        assert entry["slopes"]["active"] == pytest.approx(40 * MiB, rel=0.01)
        low, high = entry["interval"]["active"]
        assert low <= entry["slopes"]["active"] <= high
        assert "40.0 MiB/step" in entry["meaning"]

    def test_mixed_names_the_parts(self) -> None:
        entry = life_of(10 * MiB, 10 * MiB, 0).entry()
        assert "arrays_retained 10.0" in entry["meaning"]
        assert "cache_growth 10.0" in entry["meaning"]

    def test_unmeasured_mlx_counters_are_not_zero(self) -> None:
        entry = life_of(40 * MiB, 0, 0, measured=False).entry()
        assert entry["verdict"] == "unattributed"
        assert entry["slopes"]["active"] is None and entry["slopes"]["outside"] is None
        assert entry["slopes"]["footprint"] == pytest.approx(40 * MiB, rel=0.01)

    def test_too_few_steps_is_no_verdict_yet(self) -> None:
        life = LifeForensics(1, 0.0, MiB)
        for step in range(1, 6):
            life.observe_step(step, step * 100 * MiB, step * 100 * MiB, 0)
        entry = life.entry()
        assert entry["verdict"] == "none" and "too few" in entry["meaning"]

    def test_a_guard_only_life_grows_per_second(self) -> None:
        life = LifeForensics(1, 100.0, MiB)
        for tick in range(400):
            life.observe_sample(100.0 + tick * 0.05, 50 * MiB + int(tick * 0.05 * 8 * MiB))
        entry = life.entry()
        assert entry["per"] == "second" and entry["verdict"] == "unattributed"
        assert entry["slopes"] == {"footprint": pytest.approx(8 * MiB, rel=0.01)}
        assert "8.00 MiB/second" in entry["meaning"]

    def test_judge_on_no_fits_is_none(self) -> None:
        assert judge({"footprint": None}, MiB).verdict == "none"
        assert judge({"footprint": Fit(0.0, 0.0, 0.0, 10)}, MiB).verdict == "none"


def rows(start: int, count: int, fp: int, growth: int, cache: int | None = 10 * MiB) -> list[tuple[int, int, int,
                                                                                                  int | None]]:
    return [(start + i, fp + growth * i, fp // 2 + growth * i, cache) for i in range(count)]


class TestCacheClears:
    """Each clear: what it released (the largest fall among the first steps after it) and the growth after."""

    def test_release_and_growth_that_went_on(self) -> None:
        clears = CacheClears(MiB)
        clears.asked(1.0, (10, 1000 * MiB, 500 * MiB, 12 * MiB))
        record = None
        after = [(11, 1040 * MiB, 540 * MiB, 12 * MiB), (12, 1068 * MiB, 580 * MiB, 0)]
        after += [(13 + i, (1116 + 48 * i) * MiB, (628 + 48 * i) * MiB, MiB) for i in range(6)]
        for row in after:
            assert record is None
            record = clears.observe(row)
        assert record is not None
        assert record["step"] == 12 and record["released_bytes"] == 12 * MiB and record["went_on"]
        assert record["text"] == "clear_cache released 12.0 MiB; growth went on at 48.0 MiB/step"
        assert clears.summary()["measured"] == 1 and clears.summary()["released_bytes"] == 12 * MiB

    def test_growth_that_stopped(self) -> None:
        clears = CacheClears(MiB)
        clears.asked(1.0, (10, 1000 * MiB, 500 * MiB, 100 * MiB))
        record = None
        for step in range(11, 20):
            record = clears.observe((step, 900 * MiB, 500 * MiB, 0)) or record
        assert record is not None and not record["went_on"]
        assert record["text"].startswith("clear_cache released 100.0 MiB; growth stopped")

    def test_without_a_cache_counter_the_footprint_tells(self) -> None:
        clears = CacheClears(MiB)
        clears.asked(1.0, (10, 1000 * MiB, None, None))
        record = None
        for step, fp in [(11, 990), (12, 1010), (13, 1030), (14, 1050), (15, 1070), (16, 1090), (17, 1110)]:
            record = clears.observe((step, fp * MiB, None, None)) or record
        assert record is not None and record["released_of"] == "footprint"
        assert record["released_bytes"] == 10 * MiB and record["went_on"]

    def test_a_life_that_ends_early_finishes_with_what_it_has(self) -> None:
        clears = CacheClears(MiB)
        clears.asked(1.0, (10, 1000 * MiB, 500 * MiB, 12 * MiB))
        assert clears.observe((11, 1040 * MiB, 540 * MiB, 2 * MiB)) is None
        record = clears.flush()
        assert record is not None and record["went_on"] and record["growth_bytes_per_step"] == 40 * MiB
        assert not clears.measuring and clears.flush() is None

    def test_one_test_at_a_time_and_bounded(self) -> None:
        clears = CacheClears(MiB, keep=3, follow=1)
        for n in range(10):
            clears.asked(float(n), (n * 10, 1000 * MiB, 0, 10 * MiB))
            clears.asked(float(n), (n * 10, 1000 * MiB, 0, 10 * MiB))  # while one is measured: counted only
            for step in (n * 10 + 1, n * 10 + 2):
                clears.observe((step, 1000 * MiB, 0, 0))
        summary = clears.summary()
        assert summary["sent"] == 20 and summary["measured"] == 10 and len(summary["last"]) == 3


class TestJobDiagnosis:
    """Lives end into a bounded list with totals; diagnose_on_leak fires once, at the first leak verdict."""

    def test_lives_are_bounded_with_totals_and_an_overall_verdict(self) -> None:
        diagnosis = JobDiagnosis(MiB, keep=4)
        for life in range(1, 11):
            for step in range(1, 40):
                diagnosis.step(life, float(life), (step, step * 50 * MiB, step * 50 * MiB, 0))
        summary = diagnosis.summary()
        assert summary["lives_total"] == 10 and len(summary["lives"]) == 5  # the last 4 and the current one
        assert summary["verdicts"] == {"arrays_retained": 10}
        assert summary["overall"]["verdict"] == "arrays_retained"
        assert summary["overall"]["slopes"]["active"] == pytest.approx(50 * MiB)
        ended = diagnosis.end()
        assert ended is not None and ended["life"] == 10 and diagnosis.status()["life"] == 10

    def test_diagnose_on_leak_fires_once(self) -> None:
        diagnosis = JobDiagnosis(MiB, auto=True)
        fired = [step for step in range(1, 200)
                 if diagnosis.step(1, 0.0, (step, step * 50 * MiB, step * 50 * MiB, 0))]
        assert len(fired) == 1 and fired[0] < 20

    def test_no_leak_never_fires(self) -> None:
        diagnosis = JobDiagnosis(MiB, auto=True)
        assert not any(diagnosis.step(1, 0.0, (step, 500 * MiB, 400 * MiB, 0)) for step in range(1, 200))
