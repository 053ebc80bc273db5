"""What the kit's lives share: the report, what one life leaves for the next, and the expected ways of leaving."""

from __future__ import annotations

import dataclasses
import time

from protocol.conformance.harness import Abort, Harness, Life, Options
from protocol.messages import FINISHED, CheckpointSaved, Goodbye, Heartbeat, Hello, Message


@dataclasses.dataclass(frozen=True)
class Result:
    check: str
    ok: bool
    detail: str


class Report:
    """Results in check order; ``begin`` marks the check an Abort is charged to."""

    def __init__(self) -> None:
        self.results: dict[str, Result] = {}
        self.current = ""

    def begin(self, name: str) -> None:
        self.current = name

    def record(self, name: str, problems: list[str], ok_detail: str) -> None:
        self.results[name] = Result(name, not problems, "; ".join(problems) if problems else ok_detail)

    def fail_rest(self, names: list[str], reason: str) -> None:
        for name in names:
            if name not in self.results:
                self.results[name] = Result(name, False, reason)


@dataclasses.dataclass
class State:
    """What one life leaves for the next."""

    exit_step: int | None = None  # checkpoint written on checkpoint_exit (life 1)
    newest: int | None = None  # newest checkpoint after life 2


def not_done(message: Message) -> str:
    """Refuse a goodbye or a checkpoint where the script expects training to go on."""
    if isinstance(message, Goodbye) and message.reason == FINISHED:
        return f"the worker finished its training (step {message.step}) before the check: give it more steps"
    if isinstance(message, Goodbye | CheckpointSaved):
        return f"unexpected {message.TAG} (step {message.step}) while training should go on"
    return ""


def read_hello(life: Life, options: Options) -> Hello:
    first = life.expect(lambda m: not isinstance(m, Heartbeat), "frame (hello)", options.timeout).message
    if not isinstance(first, Hello):
        raise Abort(f"first frame is {first.TAG}, not hello")
    return first


def start(harness: Harness, report: Report, check: str, batch: int, accum: int,
          extra_env: dict[str, str] | None = None, orphanable: bool = False) -> tuple[Life, Hello]:
    """Spawn a life whose first check is ``check`` and read its hello."""
    report.begin(check)
    life = harness.spawn(batch=batch, accum=accum, extra_env=extra_env, orphanable=orphanable)
    return life, read_hello(life, harness.options)


def leaves(life: Life, timeout: float, why: str) -> tuple[CheckpointSaved, Goodbye, int | None, float]:
    """Expect checkpoint_saved, then goodbye, then the exit; returns them and the seconds it all took."""
    started = time.monotonic()
    saved = life.expect_a(CheckpointSaved, f"checkpoint_saved {why}", timeout,
                          refuse=lambda m: "goodbye before checkpoint_saved" if isinstance(m, Goodbye) else "")
    bye = life.expect_a(Goodbye, f"goodbye {why}", timeout,
                        refuse=lambda m: f"{m.TAG} after checkpoint_saved, before goodbye")
    code = life.wait_exit(timeout)
    return saved, bye, code, time.monotonic() - started


def exit_problems(life: Life, saved: CheckpointSaved, bye: Goodbye, code: int | None, expected: int) -> list[str]:
    problems = []
    if bye.step != saved.step:
        problems.append(f"goodbye step {bye.step} is not the checkpoint's {saved.step}")
    if code != expected:
        problems.append(f"exit status {code}, expected {expected}" if code is not None else "did not exit")
    if not life.verified[saved.step].ok:
        problems.append(life.verified[saved.step].detail)
    return problems
