"""What a crashed worker's stderr says, and what to do about it: pure functions over its last lines.

When a worker exits unasked, the job reads a bounded tail of its stderr.log and hands it to the lifecycle with
the exit. ``classify`` matches it against known MLX, Metal and Python failures (a *signature*) and against
usage or configuration errors; ``crash_policy`` says what the lifecycle does:

| signature                 | what it is                                                  | policy           |
|---------------------------|-------------------------------------------------------------|------------------|
| metal_resource_limit      | `[metal::malloc] Resource limit (499000) exceeded`: too     | recycle: restart |
|                           | many live Metal buffers, often mx.compile tracing new       | at once, same    |
|                           | shapes (ml-explore/mlx#4464, #3849); a fresh process clears | batch, no backoff|
| metal_insufficient_memory | a Metal command buffer failed with "Insufficient Memory"    | out of memory:   |
| bad_alloc                 | `std::bad_alloc`: a native allocation failed                | restart at once, |
| memory_error              | Python `MemoryError`                                        | batch halved     |
| usage_error               | before its hello: exit 2, an argparse `usage:`/`error:`,    | FATAL at once    |
|                           | or a `ValueError` traceback                                 | (not retried)    |
| (none)                    | any other crash                                             | back off, retry  |

A guard-only job has no batch: out of memory starts it over as a recycle does; any other crash ends it FATAL (as
before). Every restart counts toward ``max_attempts_without_progress``.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import signal
from collections.abc import Sequence
from typing import Any

TAIL_LINES = 20  # lines of stderr kept with a crash
TAIL_BYTES = 16 * 1024  # read at most this much from the end of stderr.log


class CrashPolicy(enum.Enum):
    BACKOFF = "backoff"  # an ordinary crash: restart after the backoff delay, same batch
    RECYCLE = "recycle"  # a fresh process clears it: restart at once, same batch
    SHRINK = "shrink"  # out of memory: restart at once with a smaller batch
    FATAL = "fatal"  # the worker's own usage or configuration error: retrying cannot help


@dataclasses.dataclass(frozen=True)
class Signature:
    name: str
    pattern: re.Pattern[str]
    policy: CrashPolicy
    hint: str


SIGNATURES = (
    Signature("metal_resource_limit", re.compile(r"\[metal::malloc\] Resource limit \(\d+\) exceeded"),
              CrashPolicy.RECYCLE,
              "MLX hit Metal's limit on live buffers, often mx.compile tracing new shapes (ml-explore/mlx#4464, "
              "#3849); a fresh process clears it: compile with shapeless=True or pad inputs to fixed shapes"),
    Signature("metal_insufficient_memory",
              re.compile(r"Command buffer execution failed: Insufficient Memory|CallbackErrorOutOfMemory"),
              CrashPolicy.SHRINK, "the GPU ran out of memory in a command buffer: a smaller batch needs less"),
    Signature("bad_alloc", re.compile(r"std::bad_alloc"), CrashPolicy.SHRINK,
              "a native allocation failed (out of memory): a smaller batch needs less"),
    Signature("memory_error", re.compile(r"^MemoryError\b", re.MULTILINE), CrashPolicy.SHRINK,
              "Python ran out of memory: a smaller batch needs less"),
)
USAGE = Signature("usage_error", re.compile(r"^(usage: |\S+: error: |ValueError: )", re.MULTILINE),
                  CrashPolicy.FATAL, "the worker refused its arguments or configuration: fix them and start again")
EXIT_USAGE = 2  # argparse's exit status, and the built-in workers' for a bad option


@dataclasses.dataclass(frozen=True)
class Crash:
    """A crash as the user should see it: its exit, its last stderr lines, what it matched, what is done."""

    code: int
    tail: tuple[str, ...]
    signature: str | None
    policy: CrashPolicy
    hint: str = ""

    @property
    def line(self) -> str:
        """The error line to quote: the last non-blank line of stderr ('' without one)."""
        return next((line.strip() for line in reversed(self.tail) if line.strip()), "")

    def record(self) -> dict[str, Any]:
        """The summary's and status's ``last_error``."""
        name = None
        if self.code < 0:
            name = signal.Signals(-self.code).name if -self.code in _SIGNALS else f"signal {-self.code}"
        return {"exit_code": self.code if self.code >= 0 else None, "signal": name, "stderr_tail": list(self.tail),
                "signature": self.signature}

    def describe(self, exit_words: str) -> str:
        """``exit_words`` (e.g. "exit 2") with the error line and the signature's name."""
        quoted = f": {self.line}" if self.line else ""
        named = f" [{self.signature}]" if self.signature else ""
        return f"{exit_words}{named}{quoted}"


_SIGNALS = {s.value for s in signal.Signals}


def classify(code: int, tail: Sequence[str], hello: bool) -> Crash:
    """The crash of a worker that exited with ``code`` (negative: killed by that signal) after writing ``tail``
    to stderr; ``hello``: whether it had said hello (a usage error is one that comes before)."""
    text = "\n".join(tail)
    for sig in SIGNATURES:
        if sig.pattern.search(text):
            return Crash(code, tuple(tail), sig.name, sig.policy, sig.hint)
    if not hello and (code == EXIT_USAGE or (code > 0 and USAGE.pattern.search(text))):
        return Crash(code, tuple(tail), USAGE.name, USAGE.policy, USAGE.hint)
    return Crash(code, tuple(tail), None, CrashPolicy.BACKOFF)


def last_lines(data: bytes, partial: bool = False, lines: int = TAIL_LINES) -> tuple[str, ...]:
    """The last ``lines`` lines of a chunk read from the end of a file (``partial``: it began mid-line, so its
    first line is dropped), decoded leniently, without their line ends, each cut at 500 characters."""
    text = data.decode("utf-8", errors="replace")
    split = text.splitlines()
    if partial and split:
        split = split[1:]
    return tuple(line[:500] for line in split[-lines:])
