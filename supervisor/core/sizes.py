"""Human sizes and budgets: ``12GiB``, ``1.5 GB``, ``75%``, ``total - 4GiB``.

Decimal units (KB, MB, GB, TB) are powers of 1000 and binary units (KiB, MiB, GiB, TiB, and the shorthands
K, M, G, T) powers of 1024: memory is sold in one and reported in the other, so both are spelled out.
Arithmetic is done in ``Decimal`` so ``1.1TB`` is exactly 1_100_000_000_000 bytes, never off by float error.
"""

from __future__ import annotations

import math
import re
from decimal import ROUND_FLOOR, ROUND_HALF_EVEN, Decimal
from typing import Final

_UNITS: Final[dict[str, int]] = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "k": 1024,
    "m": 1024**2,
    "g": 1024**3,
    "t": 1024**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_FORMAT_UNITS: Final = ("B", "KiB", "MiB", "GiB", "TiB")

ACCEPTED_SIZES: Final = (
    "a number of bytes with an optional unit: B, KB, MB, GB, TB (powers of 1000) or "
    "KiB, MiB, GiB, TiB, K, M, G, T (powers of 1024), e.g. 12GiB, 1.5 GB, 4096"
)

# ASCII digits only: \d would also take other scripts' digits, which Decimal happily accepts.
_NUMBER: Final = r"(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_SIZE_RE: Final = re.compile(_NUMBER + r"\s*(?P<unit>[A-Za-z]*)")
_PERCENT_RE: Final = re.compile(_NUMBER + r"\s*%")
_TOTAL_MINUS_RE: Final = re.compile(r"total\s*-\s*(?P<rest>.*)", re.IGNORECASE | re.DOTALL)


class SizeError(ValueError):
    """A size, percentage or budget that cannot be used; the message names the value and what is accepted."""


def parse_bytes(text: str | int) -> int:
    """Bytes from ``"12GiB"``, ``"1.5 GB"``, ``"512M"``, ``"4096"`` or ``4096``; units are case-insensitive.

    Fractions are rounded to the nearest byte; a plain byte count must be whole. Negative numbers, bools,
    empty strings, NaN and anything else raise SizeError.
    """
    if isinstance(text, bool) or not isinstance(text, int | str):
        raise SizeError(f"size {text!r}: expected a string or an integer, got {type(text).__name__}")
    if isinstance(text, int):
        if text < 0:
            raise SizeError(f"size {text}: must not be negative")
        return text
    stripped = text.strip()
    match = _SIZE_RE.fullmatch(stripped)
    if match is None:
        if stripped.startswith("-"):
            raise SizeError(f"size {text!r}: must not be negative")
        raise SizeError(f"invalid size {text!r}: expected {ACCEPTED_SIZES}")
    multiplier = _UNITS.get(match["unit"].lower())
    if multiplier is None:
        raise SizeError(f"size {text!r}: unknown unit {match['unit']!r}; expected {ACCEPTED_SIZES}")
    value = Decimal(match["number"]) * multiplier
    if multiplier == 1 and value != value.to_integral_value():
        raise SizeError(f"size {text!r}: a number of bytes must be whole")
    return int(value.to_integral_value(ROUND_HALF_EVEN))


def format_bytes(n: int) -> str:
    """``n`` bytes for people: ``"1023 B"``, ``"1.50 GiB"``, ``"512.0 MiB"`` (about 3-4 significant digits).

    The output parses back with ``parse_bytes`` to within 0.5%.
    """
    if n < 0:
        return "-" + format_bytes(-n)
    if n < 1024:
        return f"{n} B"
    index = 0
    while n >= 1024 ** (index + 1) and index < len(_FORMAT_UNITS) - 1:
        index += 1
    text = _two_or_one_decimals(n / 1024**index)
    # 1048575 B is 1023.999 KiB, which would print as "1024.0 KiB": move up a unit instead.
    if float(text) >= 1024 and index < len(_FORMAT_UNITS) - 1:
        index += 1
        text = _two_or_one_decimals(n / 1024**index)
    return f"{text} {_FORMAT_UNITS[index]}"


def _two_or_one_decimals(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def parse_budget(text: str | int, total: int) -> int:
    """A job's hard budget in bytes, from bytes (``"12GiB"``, ``12884901888``), a percentage of total memory
    (``"75%"``, strictly between 0 and 100) or ``"total - 4GiB"`` (spaces optional).

    The result must be above zero and below ``total``; otherwise SizeError says by how much it is not.
    """
    shown = text.strip() if isinstance(text, str) else str(text)
    if isinstance(text, str) and (percent := _percent(shown)) is not None:
        if not 0 < percent < 100:
            raise SizeError(f"budget {shown!r}: a percentage of total memory must be above 0% and below 100%")
        budget = _floor(total * percent / 100)
    elif isinstance(text, str) and (match := _TOTAL_MINUS_RE.fullmatch(shown)) is not None:
        try:
            budget = total - parse_bytes(match["rest"])
        except SizeError as exc:
            raise SizeError(f"budget {shown!r}: {exc}") from None
    else:
        try:
            budget = parse_bytes(text)
        except SizeError as exc:
            hint = "a budget may also be a percentage of total memory (75%) or 'total - 4GiB'"
            raise SizeError(f"{exc}; {hint}") from None
    if budget <= 0:
        raise SizeError(
            f"budget {shown} leaves nothing ({format_bytes(budget)}): it must be above zero "
            f"(total memory is {format_bytes(total)})"
        )
    if budget >= total:
        raise SizeError(f"budget {shown} is at or above total memory ({format_bytes(total)})")
    return budget


def parse_fraction_of(text: str | int | float, base: int) -> int:
    """Bytes relative to ``base`` (a job's budget, or total memory): ``"85%"`` is 0.85 x base, ``"110%"``
    1.1 x base (percentages may exceed 100); a float is a plain ratio (``0.85``); anything else is absolute
    bytes (``"3GiB"``, ``3221225472``). Rounds down to whole bytes.
    """
    if isinstance(text, float):
        # repr gives the shortest decimal that round-trips: 0.85, not 0.8499999999999999778...
        if not (math.isfinite(text) and text >= 0):
            raise SizeError(f"ratio {text!r}: expected a finite number >= 0 (0.85 is 85%)")
        return _floor(base * Decimal(repr(text)))
    if not isinstance(text, str):
        return parse_bytes(text)
    shown = text.strip()
    percent = _percent(shown)
    if percent is not None:
        return _floor(base * percent / 100)
    try:
        return parse_bytes(shown)
    except SizeError as exc:
        raise SizeError(f"{exc}; a percentage (85%, 110%) is also accepted here") from None


def _percent(text: str) -> Decimal | None:
    """The number of ``"85%"``; None when ``text`` is not meant as a percentage (no trailing %)."""
    if not text.endswith("%"):
        return None
    match = _PERCENT_RE.fullmatch(text)
    if match is None:
        raise SizeError(f"invalid percentage {text!r}: expected a number >= 0 followed by %, e.g. 85%")
    return Decimal(match["number"])


def _floor(value: Decimal) -> int:
    return int(value.to_integral_value(ROUND_FLOOR))
