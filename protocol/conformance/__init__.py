"""Conformance kit for workers in any language: ``python -m protocol.conformance -- CMD [ARGS...]``.

It runs ``CMD`` under a scripted supervisor (its own ROUTER socket on ipc in a private 0700 directory, the
``MLXSUP_*`` environment, a spawn token per life) and checks the rules of docs/PROTOCOL.md, one PASS/FAIL per
check. Unlike the rest of ``protocol/`` it needs pyzmq and psutil (it plays the daemon's part).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from protocol.conformance.checks import CHECKS, run_checks
from protocol.conformance.harness import Harness, Options
from protocol.conformance.script import Result

__all__ = ["CHECKS", "Options", "Result", "run"]


def run(argv: Sequence[str], options: Options | None = None, only: Iterable[str] = ()) -> list[Result]:
    """Check the worker started by ``argv``; ``only`` limits the checks (and the lives run for them)."""
    selected = set(only) or set(CHECKS)
    unknown = selected - set(CHECKS)
    if unknown:
        raise ValueError(f"unknown check(s) {sorted(unknown)}; known: {', '.join(CHECKS)}")
    harness = Harness(argv, options or Options())
    try:
        return run_checks(harness, selected)
    finally:
        harness.close()
