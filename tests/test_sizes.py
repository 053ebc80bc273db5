"""Human sizes, budgets and bands: what parses to what, what is refused, and what the refusal says."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from supervisor.core.sizes import SizeError, format_bytes, parse_budget, parse_bytes, parse_fraction_of

KiB, MiB, GiB, TiB = 1024, 1024**2, 1024**3, 1024**4
TOTAL = int(23.4 * GiB)  # a 24 GB machine as psutil reports it
UNITS = {
    "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KiB": KiB, "MiB": MiB, "GiB": GiB, "TiB": TiB, "K": KiB, "M": MiB, "G": GiB, "T": TiB,
}  # fmt: skip


class TestParseBytes:
    """parse_bytes: decimal and binary units, case and spacing, and what it refuses."""

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("12GiB", 12 * GiB),
            ("1.5 GB", 1_500_000_000),
            ("512MiB", 512 * MiB),
            ("300MB", 300_000_000),
            ("4096", 4096),
            (4096, 4096),
            (0, 0),
            ("0", 0),
            ("2g", 2 * GiB),
            ("2G", 2 * GiB),
            ("1k", KiB),
            ("1.5T", int(1.5 * TiB)),
            ("1.1TB", 1_100_000_000_000),  # exact: no float error
            ("  64 mib  ", 64 * MiB),
            ("64gIb", 64 * GiB),
            ("10b", 10),
            (".5KiB", 512),
            ("1.KiB", KiB),
            ("1.0001KiB", KiB),  # rounded to the nearest byte
        ],
    )
    def test_parses(self, text: str | int, expected: int) -> None:
        assert parse_bytes(text) == expected

    @pytest.mark.parametrize(
        ("value", "fragment"),
        [
            ("", "invalid size ''"),
            ("   ", "invalid size '   '"),
            ("abc", "invalid size 'abc'"),
            ("NaN", "invalid size 'NaN'"),
            ("inf", "invalid size 'inf'"),
            ("1e9", "invalid size '1e9'"),
            ("12 GiB extra", "invalid size '12 GiB extra'"),
            ("12XB", "unknown unit 'XB'"),
            ("12PiB", "unknown unit 'PiB'"),
            ("1,5GB", "invalid size '1,5GB'"),
            ("-1GiB", "size '-1GiB': must not be negative"),
            (-1, "size -1: must not be negative"),
            ("1.5", "size '1.5': a number of bytes must be whole"),
            ("١٢GiB", "invalid size '١٢GiB'"),  # Arabic-Indic digits: ASCII only
            (True, "size True: expected a string or an integer, got bool"),
            (1.5, "size 1.5: expected a string or an integer, got float"),
            (None, "size None: expected a string or an integer, got NoneType"),
        ],
    )
    def test_rejects_naming_the_value(self, value: object, fragment: str) -> None:
        with pytest.raises(SizeError) as info:
            parse_bytes(value)  # type: ignore[arg-type]
        assert fragment in str(info.value)

    def test_rejection_lists_the_accepted_units(self) -> None:
        with pytest.raises(SizeError, match=r"KB, MB, GB, TB \(powers of 1000\).*KiB, MiB, GiB, TiB"):
            parse_bytes("12 gigs")

    def test_size_error_is_a_value_error(self) -> None:
        with pytest.raises(ValueError, match="abc"):
            parse_bytes("abc")

    @given(st.integers(0, 10**6), st.sampled_from(sorted(UNITS)), st.booleans(), st.sampled_from(["", " "]))
    def test_whole_numbers_in_any_unit(self, number: int, unit: str, upper: bool, space: str) -> None:
        text = f"{number}{space}{unit.upper() if upper else unit.lower()}"
        assert parse_bytes(text) == number * UNITS[unit]

    @given(st.text(max_size=20))
    def test_any_text_gives_bytes_or_size_error(self, text: str) -> None:
        try:
            assert parse_bytes(text) >= 0
        except SizeError as exc:
            assert repr(text) in str(exc)


class TestFormatBytes:
    """format_bytes: short binary units that parse back."""

    @pytest.mark.parametrize(
        ("n", "expected"),
        [
            (0, "0 B"),
            (1023, "1023 B"),
            (1024, "1.00 KiB"),
            (int(1.5 * GiB), "1.50 GiB"),
            (512 * MiB, "512.0 MiB"),
            (TOTAL, "23.4 GiB"),
            (MiB - 1, "1.00 MiB"),  # not "1024.0 KiB"
            (3 * TiB, "3.00 TiB"),
            (2048 * TiB, "2048.0 TiB"),
            (-512 * MiB, "-512.0 MiB"),
        ],
    )
    def test_formats(self, n: int, expected: str) -> None:
        assert format_bytes(n) == expected

    @given(st.integers(0, 2**60))
    def test_round_trips_within_rounding(self, n: int) -> None:
        parsed = parse_bytes(format_bytes(n))
        assert abs(parsed - n) <= n * 0.005 + 1


class TestParseBudget:
    """parse_budget: bytes, percent of total, or total minus bytes, strictly between zero and total."""

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("12GiB", 12 * GiB),
            (12 * GiB, 12 * GiB),
            ("75%", math.floor(TOTAL * 0.75)),
            ("50 %", TOTAL // 2),
            ("12.5%", TOTAL // 8),
            ("total - 4GiB", TOTAL - 4 * GiB),
            ("total-4GiB", TOTAL - 4 * GiB),
            ("  TOTAL -  512 MiB ", TOTAL - 512 * MiB),
            ("1", 1),
        ],
    )
    def test_parses(self, text: str | int, expected: int) -> None:
        assert parse_budget(text, TOTAL) == expected

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ("24GiB", "budget 24GiB is at or above total memory (23.4 GiB)"),
            (TOTAL, f"budget {TOTAL} is at or above total memory (23.4 GiB)"),
            ("total - 0", "budget total - 0 is at or above total memory (23.4 GiB)"),
            ("100%", "budget '100%': a percentage of total memory must be above 0% and below 100%"),
            ("150%", "budget '150%': a percentage of total memory must be above 0% and below 100%"),
            ("0%", "budget '0%': a percentage of total memory must be above 0% and below 100%"),
            ("0", "budget 0 leaves nothing (0 B): it must be above zero (total memory is 23.4 GiB)"),
            ("total - 30GiB", "budget total - 30GiB leaves nothing (-6.60 GiB)"),
            ("total - lots", "budget 'total - lots': invalid size 'lots'"),
            ("-2GiB", "size '-2GiB': must not be negative"),
            ("x%", "invalid percentage 'x%'"),
            ("-5%", "invalid percentage '-5%'"),
            ("half", "invalid size 'half'"),
        ],
    )
    def test_rejects_with_clear_message(self, text: str | int, message: str) -> None:
        with pytest.raises(SizeError) as info:
            parse_budget(text, TOTAL)
        assert message in str(info.value)

    def test_unparsable_budget_mentions_the_other_forms(self) -> None:
        with pytest.raises(SizeError, match=r"percentage of total memory \(75%\) or 'total - 4GiB'"):
            parse_budget("most of it", TOTAL)

    @given(st.integers(1, 2**50), st.data())
    def test_result_always_strictly_inside_total(self, total: int, data: st.DataObject) -> None:
        text = data.draw(
            st.one_of(
                st.integers(0, 2 * total).map(str),
                st.floats(0, 200, allow_nan=False).map(lambda p: f"{p:.3f}%"),
                st.integers(0, 2 * total).map(lambda n: f"total - {n}"),
            )
        )
        try:
            budget = parse_budget(text, total)
        except SizeError:
            return
        assert 0 < budget < total


class TestParseFractionOf:
    """parse_fraction_of: warn/kill bands as a percentage of the budget (may exceed 100%) or bytes."""

    BUDGET = 10 * GiB

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("85%", math.floor(10 * GiB * 0.85)),
            ("110%", 11 * GiB),
            ("100%", 10 * GiB),
            ("250%", 25 * GiB),
            ("0%", 0),
            ("12.5%", 10 * GiB // 8),
            ("3GiB", 3 * GiB),
            (3 * GiB, 3 * GiB),
            ("0", 0),
            (0.85, math.floor(10 * GiB * 0.85)),
            (1.1, 11 * GiB),
        ],
    )
    def test_parses(self, text: str | int | float, expected: int) -> None:
        assert parse_fraction_of(text, self.BUDGET) == expected

    @pytest.mark.parametrize(
        ("text", "fragment"),
        [
            ("abc", "invalid size 'abc'"),
            ("85 percent", "unknown unit 'percent'"),
            ("%", "invalid percentage '%'"),
            ("-10%", "invalid percentage '-10%'"),
            ("-1GiB", "size '-1GiB': must not be negative"),
            (float("nan"), "ratio nan"),
            (float("inf"), "ratio inf"),
            (-0.5, "ratio -0.5"),
            (False, "size False"),
        ],
    )
    def test_rejects_naming_the_value(self, text: str | int | float, fragment: str) -> None:
        with pytest.raises(SizeError) as info:
            parse_fraction_of(text, self.BUDGET)
        assert fragment in str(info.value)

    def test_unparsable_band_mentions_percentages(self) -> None:
        with pytest.raises(SizeError, match=r"a percentage \(85%, 110%\) is also accepted"):
            parse_fraction_of("lots", self.BUDGET)

    @given(st.integers(0, 2**50), st.integers(0, 1000))
    def test_whole_percentages_are_exact(self, base: int, percent: int) -> None:
        assert parse_fraction_of(f"{percent}%", base) == base * percent // 100
