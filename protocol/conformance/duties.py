"""The checks of the 1.1 duties (docs/PROTOCOL.md): holding, startup, orphans, and checkpoints found on disk.

Four lives besides ``holding`` (run inside the first life): a slow load that gets SIGTERM before its hello; a hello
that gets no answer; a resume past a damaged newest checkpoint and a ``.trash`` to restore, whose parent then
dies; a long step during which the daemon falls silent. Slow loads and long steps are asked of the worker with
the kit's steering variables (``LOAD_ENV``, ``SLOW_EVERY_ENV``, ``SLOW_SECONDS_ENV``: PROTOCOL.md section 9).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from protocol.checkpoints import CheckpointDamaged, checkpoint_name, list_checkpoints, step_of, verify
from protocol.conformance.adopt import EXIT_UNKNOWN, Adopted
from protocol.conformance.harness import Abort, Harness, Life, Options, Received
from protocol.conformance.script import Report, State, leaves_orphaned, not_done, read_hello, start
from protocol.messages import EXIT_CHECKPOINTED, CheckpointSaved, Command, Goodbye, Heartbeat, Step, Steps

LOAD_ENV = "MLXSUP_CONFORMANCE_LOAD_SECONDS"
SLOW_EVERY_ENV = "MLXSUP_CONFORMANCE_SLOW_EVERY"
SLOW_SECONDS_ENV = "MLXSUP_CONFORMANCE_SLOW_SECONDS"
LOAD_SECONDS = 30.0  # the slow load asked for: the kit sends SIGTERM long before it ends
LOAD_WATCH = 3.5  # seconds of the load watched after its first heartbeat (an orphan timer wrongly running
# before the hello ends a worker 1.5 × MLXSUP_ORPHAN_TIMEOUT = 2.25 s into it)
SLOW_EVERY, SLOW_SECONDS = 20, 30.0  # every 20th step is long; the watchdog ends the process long before 30 s
KEEPALIVE_WATCH = 3.0  # seconds of a long step watched with heartbeats going, before the kit falls silent
BEAT_GAP = 2.0  # the longest a loading or busy worker may go without a frame ("about once a second")
HOLD: dict[str, Any] = {"hold": 0.25, "hold_below": 2**62, "hold_horizon": 6, "hold_rows": 5}
HOLD_WATCH = 1.0  # seconds of steps watched with holding granted
HOLD_SLACK = 0.5  # a held step may wait hold + this long (a worker looks at its clock between steps)
FLUSH_GAP = 0.02  # seconds between steps frames that went out in one flush
QUIET = 0.5  # seconds without a heartbeat after a command, during which every step is its own frame


def _is_step(item: Received) -> bool:
    return isinstance(item.message, Step | Steps)


def _numbers(items: list[Received]) -> list[int]:
    """The step numbers of the step and steps frames among ``items``, in arrival order."""
    numbers: list[int] = []
    for item in items:
        if isinstance(item.message, Step):
            numbers.append(item.message.step)
        elif isinstance(item.message, Steps):
            numbers.extend(item.message.step)
    return numbers


def _held_seconds(items: list[Received]) -> float:
    """A lower bound of the longest time a held step waited: steps frames that arrive together (one flush) carry
    steps whose first row's boundary came at least the sum of the later rows' step_seconds before the last's."""
    longest, flush, last_at = 0.0, list[float](), -1.0
    for item in [*items, None]:
        message = item.message if item is not None else None
        if item is None or not isinstance(message, Steps) or item.at - last_at > FLUSH_GAP:
            longest = max(longest, sum(flush[1:]))
            flush = []
        if item is not None and isinstance(message, Steps):
            flush.extend(message.step_seconds)
            last_at = item.at
    return longest


def _watch(life: Life, seconds: float) -> list[Received]:
    """Frames of the next ``seconds``; Abort on an exit, a goodbye or a checkpoint nobody asked for."""
    mark, deadline = len(life.received), time.monotonic() + seconds
    while time.monotonic() < deadline:
        item = life.next(deadline)
        if item is None and life.popen.poll() is not None:
            raise Abort(f"the worker exited{life.exit_note()}")
        if item is not None and (problem := not_done(item.message)):
            raise Abort(problem)
    return life.received[mark:]


def check_holding(life: Life, report: Report, options: Options) -> None:
    """Grant holding, then a command without heartbeats: the held steps first, then one frame per step."""
    report.begin("holding")
    rows, hold = HOLD["hold_rows"], HOLD["hold"]
    life.grant = dict(HOLD)
    granted = [item for item in _watch(life, HOLD_WATCH) if _is_step(item)]
    batched = [item.message for item in granted if isinstance(item.message, Steps)]
    problems = []
    if not batched:
        problems.append(f"no steps frame in {HOLD_WATCH:g} s of holding granted (hold {hold:g} s, hold_rows {rows}):"
                        f" {len(granted)} step frames")
    if over := [len(b) for b in batched if len(b) > rows]:
        problems.append(f"steps frames of {over[:3]} rows, over hold_rows {rows}")
    held = _held_seconds(granted)
    if held > hold + HOLD_SLACK:
        problems.append(f"a steps frame held its first row {held:.2f} s, over hold {hold:g} s + {HOLD_SLACK:g} s")
    life.heartbeats = False
    mark = len(life.received)
    life.send(Command(Command.CHECKPOINT, "holding"))
    saved = life.expect_a(CheckpointSaved, "checkpoint_saved for a command while holding", options.timeout,
                          refuse=not_done)
    before = life.last_step()
    if before != saved.step:
        problems.append(f"checkpoint_saved of step {saved.step} came when the steps up to {before} had arrived: "
                        "the held steps were not sent before it")
    after = [item for item in _watch(life, QUIET) if _is_step(item)]
    late = [item.message for item in after if isinstance(item.message, Steps)]
    if late:
        problems.append(f"{len(late)} steps frame(s) (rows {_numbers(after)[:6]}...) after the command and before "
                        "the next heartbeat: each step is its own frame then")
    numbers = _numbers(granted) + _numbers(life.received[mark:])
    if numbers and numbers != list(range(numbers[0], numbers[0] + len(numbers))):
        problems.append(f"steps {numbers[:10]}...: not each step once, in order")
    life.grant, life.heartbeats = {}, True
    singles = sum(isinstance(item.message, Step) for item in after)
    report.record("holding", problems, f"holding granted (hold {hold:g} s, hold_rows {rows}): {len(batched)} steps "
                                       f"frames of ≤ {max(map(len, batched), default=0)} rows, held ≤ {held:.2f} s; "
                                       f"a command: held steps flushed before checkpoint_saved {saved.step}, then "
                                       f"{singles} single step frames in {QUIET:g} s without a heartbeat")


def _ckpt_names(harness: Harness) -> list[str]:
    return [path.name for path in list_checkpoints(harness.checkpoints)]


def _load_heartbeats(life: Life, options: Options) -> tuple[list[float], Received | None]:
    """Token heartbeats from the spawn until LOAD_WATCH s after the first; and the first other frame, if any."""
    beats: list[float] = []
    deadline = time.monotonic() + options.timeout
    while True:
        item = life.next(deadline)
        if item is None:
            return beats, None
        if not isinstance(item.message, Heartbeat):
            return beats, item
        if not beats:
            deadline = min(deadline, item.at + LOAD_WATCH)
        beats.append(item.at)


def life_slow_load(harness: Harness, report: Report, state: State) -> None:
    """A slow load: token heartbeats before the hello, then SIGTERM ends it at once (exit 75, nothing written)."""
    options = harness.options
    report.begin("heartbeats_before_hello")
    names = _ckpt_names(harness)
    life = harness.spawn(batch=4, accum=1, extra_env={LOAD_ENV: f"{LOAD_SECONDS:g}"})
    spawned = time.monotonic()
    beats, other = _load_heartbeats(life, options)
    now = time.monotonic()
    gaps = [b - a for a, b in zip(beats, [*beats[1:], now], strict=True)] if beats else []
    problems = []
    if not beats:
        problems.append(f"no heartbeat with the token before the {other.message.TAG}" if other else
                        f"no heartbeat with the token within {options.timeout:g} s of the spawn{life.exit_note()}")
    elif max(gaps) > BEAT_GAP:
        problems.append(f"a gap of {max(gaps):.2f} s between heartbeats while loading (at most {BEAT_GAP:g} s)")
    if other is not None:
        problems.append(f"{other.message.TAG} {other.at - spawned:.1f} s after the spawn, during the "
                        f"{LOAD_ENV}={LOAD_SECONDS:g} load")
    elif beats and (code := life.popen.poll()) is not None:
        problems.append(f"exited ({code}) {now - spawned:.1f} s after the spawn, during the load{life.exit_note()}")
    report.record("heartbeats_before_hello", problems,
                  f"{len(beats)} heartbeats with the token in {now - beats[0] if beats else 0:.1f} s of the load "
                  f"(first {beats[0] - spawned if beats else 0:.1f} s after the spawn), longest gap "
                  f"{max(gaps, default=0):.2f} s, no hello")
    report.begin("sigterm_before_hello")
    if other is not None or life.popen.poll() is not None:
        gone = f"a {other.message.TAG} came" if other is not None else "the worker exited"
        report.record("sigterm_before_hello", [f"not run: heartbeats_before_hello failed ({gone} before the load "
                                               "was over)"], "")
        return
    mark, sent = len(life.received), time.monotonic()
    life.signal_group(signal.SIGTERM)
    code = life.wait_exit(options.kill_grace)
    took = time.monotonic() - sent
    problems = []
    if code != EXIT_CHECKPOINTED:
        problems.append(f"still running {options.kill_grace:g} s after SIGTERM" if code is None else
                        f"exit status {code}, expected {EXIT_CHECKPOINTED}")
    if said := [item.message.TAG for item in life.received[mark:] if not isinstance(item.message, Heartbeat)]:
        problems.append(f"sent {said[:3]} after SIGTERM before its first step: nothing to save, no goodbye")
    if (now_names := _ckpt_names(harness)) != names:
        problems.append(f"checkpoints changed from {names} to {now_names}")
    report.record("sigterm_before_hello", problems, f"SIGTERM {sent - spawned:.1f} s into the load: exit {code} "
                                                    f"{took:.2f} s later, nothing sent, no checkpoint written")


def life_no_welcome(harness: Harness, report: Report, state: State) -> None:
    """A hello with a token the kit does not accept gets no answer: train anyway in version 1, leave as
    daemon_silent."""
    options = harness.options
    report.begin("no_welcome")
    life = harness.spawn(batch=4, accum=1, wrong_token=True)
    life.heartbeats, life.read_versions = False, True
    read_hello(life, options)
    hello_at = life.received[-1].at
    left = leaves_orphaned(life, harness, options.orphan_timeout + options.timeout, "with no welcome nor heartbeat")
    bye_at, problems = left.left_at, left.problems
    steps = _numbers(life.received)
    if not steps:
        problems.append("trained no step before leaving: a worker does not wait for the welcome")
    if left.reason not in ("daemon_silent", None):
        problems.append(f"goodbye reason {left.reason!r}, expected daemon_silent")
    if versions := sorted({item.version for item in life.received} - {1}):
        problems.append(f"frames of version {versions} without a welcome: version 1 until one agrees otherwise")
    if bye_at - hello_at > options.orphan_timeout + 2.0:
        problems.append(f"left {bye_at - hello_at:.1f} s after its hello, orphan timeout {options.orphan_timeout:g} s"
                        " (the timer runs from the hello)")
    report.record("no_welcome", problems, f"wrong token, no welcome: {len(steps)} steps in version 1 frames, goodbye "
                                          f"{left.reason or 'lost'} {bye_at - hello_at:.1f} s after the hello "
                                          f"(orphan timeout {options.orphan_timeout:g} s), checkpoint {left.step}, "
                                          f"exit {left.code}{left.note()}")


def _dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", ""], stdin=subprocess.DEVNULL)
    child.wait(timeout=30)
    return child.pid


def _damage(harness: Harness) -> tuple[int, Path, Path]:
    """Copy the newest good checkpoint N to a damaged N+1 and move N aside as a dead writer's ``.trash``."""
    good = None
    for path in reversed(list_checkpoints(harness.checkpoints)):
        try:
            meta = verify(path)
        except CheckpointDamaged:
            continue
        good = path
        break
    if good is None:
        raise Abort(f"no good checkpoint from the earlier lives to work with in {harness.checkpoints}")
    step = step_of(good)
    damaged = harness.checkpoints / checkpoint_name(step + 1)
    shutil.rmtree(damaged, ignore_errors=True)
    shutil.copytree(good, damaged)
    (damaged / "meta.json").write_text(json.dumps({**meta, "step": step + 1}), encoding="utf-8")
    victim = damaged / max(meta["files"], key=lambda name: meta["files"][name]["bytes"])
    data = bytearray(victim.read_bytes()) or bytearray(b"\0")
    data[0] ^= 0xFF
    victim.write_bytes(bytes(data))
    trash = harness.checkpoints / f".trash-ckpt-{step}-{_dead_pid()}-{secrets.token_hex(4)}"
    os.rename(good, trash)
    return step, damaged, trash


def life_damaged(harness: Harness, report: Report, state: State) -> None:
    """Resume past a damaged newest checkpoint from a restored ``.trash``; then the parent dies."""
    options = harness.options
    report.begin("damaged_newest_skipped")
    step, damaged, trash = _damage(harness)
    life, hello = start(harness, report, "damaged_newest_skipped", batch=4, accum=1, orphanable=True)
    problems = []
    if hello.start_step == step + 1:
        problems.append(f"resumed at {step + 1}: loaded the damaged {damaged.name}")
    if not damaged.is_dir():
        problems.append(f"{damaged.name} removed on load: a damaged checkpoint stays for the operator")
    report.record("damaged_newest_skipped", problems, f"damaged {damaged.name} (a flipped byte) passed over and "
                                                      f"left on disk; resumed at {hello.start_step}")
    report.begin("trash_restored")
    restored = harness.checkpoints / checkpoint_name(step)
    problems = []
    if not restored.is_dir():
        problems.append(f"{trash.name} (its writer dead, {restored.name} missing) not renamed back")
    if hello.start_step not in (step, step + 1):
        problems.append(f"resumed at {hello.start_step}, not at the restored {restored.name}")
    report.record("trash_restored", problems, f"{trash.name} renamed back to {restored.name}; resumed at "
                                              f"{hello.start_step}")
    report.begin("parent_died")
    life.steps(3, options.timeout)
    assert isinstance(life.popen, Adopted)
    life.popen.kill_parent()
    left = leaves_orphaned(life, harness, options.orphan_timeout + options.timeout, "after its parent died")
    unknown = left.code == EXIT_UNKNOWN
    problems = [p for p in left.problems if not (unknown and p.startswith("exit status"))]
    if left.reason not in ("daemon_lost", None):
        problems.append(f"goodbye reason {left.reason!r} with heartbeats still coming, expected daemon_lost")
    status = "exit status not observable here (no subreaper)" if unknown else f"exit {left.code}"
    report.record("parent_died", problems, f"parent killed: checkpoint {left.step}, goodbye {left.reason or 'lost'} "
                                           f"{left.took:.2f} s later, {status}{left.note()}")


def _long_step(life: Life, options: Options, hello_at: float, start_step: int) -> tuple[float, int, list[float]]:
    """Wait for a pause of KEEPALIVE_WATCH s without a step: (when the last step came, its number, heartbeats)."""
    last_at, last, beats = hello_at, start_step, list[float]()
    deadline = time.monotonic() + options.timeout + KEEPALIVE_WATCH
    while (now := time.monotonic()) - last_at < KEEPALIVE_WATCH:
        if now >= deadline:
            raise Abort(f"no long step within {options.timeout:g} s (steps up to {last}, never a pause of "
                        f"{KEEPALIVE_WATCH:g} s): {SLOW_EVERY_ENV}={SLOW_EVERY} not honoured")
        item = life.next(min(deadline, last_at + KEEPALIVE_WATCH))
        if item is None:
            if life.popen.poll() is not None:
                raise Abort(f"the worker exited before a long step{life.exit_note()}")
        elif _is_step(item):
            last_at, last, beats = item.at, _numbers([item])[-1], []
        elif isinstance(item.message, Heartbeat):
            beats.append(item.at)
        elif problem := not_done(item.message):
            raise Abort(f"{problem} ({SLOW_EVERY_ENV}={SLOW_EVERY} not honoured?)")
    return last_at, last, beats


def life_long_step(harness: Harness, report: Report, state: State) -> None:
    """A long step: keepalives while heartbeats come, then the watchdog ends it mid-step once they stop."""
    options = harness.options
    slow = {SLOW_EVERY_ENV: str(SLOW_EVERY), SLOW_SECONDS_ENV: f"{SLOW_SECONDS:g}"}
    life, hello = start(harness, report, "keepalive_long_step", batch=4, accum=1, extra_env=slow)
    last_at, last, beats = _long_step(life, options, life.received[-1].at, hello.start_step)
    now = time.monotonic()
    gaps = [b - a for a, b in zip([last_at, *beats], [*beats, now], strict=True)]
    problems = [] if max(gaps) <= BEAT_GAP else [
        f"no frame for {max(gaps):.2f} s during the long step after step {last} (keepalives at most {BEAT_GAP:g} s "
        "apart expected)"]
    report.record("keepalive_long_step", problems, f"{len(beats)} heartbeats in the first {now - last_at:.1f} s of "
                                                   f"the long step after step {last}, longest gap {max(gaps):.2f} s")
    report.begin("orphan_watchdog")
    life.heartbeats = False
    silent_since = life.last_beat
    limit = 2 * options.orphan_timeout + 1.0
    code = life.wait_exit(max(0.0, silent_since + limit - time.monotonic()))
    took = time.monotonic() - silent_since
    problems = []
    reported = [n for n in _numbers(life.received) if n > last]
    if reported:
        problems.append(f"the long step was reported (step {reported[0]}): it reached a boundary, not ended mid-step")
    if code is None:
        problems.append(f"still running {limit:g} s after the last heartbeat, mid-step: no watchdog ended it")
    elif code != EXIT_CHECKPOINTED:
        problems.append(f"exit status {code}, expected {EXIT_CHECKPOINTED}")
    if said := [item.message.TAG for item in life.received if isinstance(item.message, Goodbye | CheckpointSaved)]:
        problems.append(f"sent {said} mid-step: the watchdog leaves without a checkpoint or a goodbye")
    report.record("orphan_watchdog", problems, f"exit {code} {took:.2f} s after the last heartbeat (orphan timeout "
                                               f"{options.orphan_timeout:g} s), mid-step: step {last + 1} not reported")

