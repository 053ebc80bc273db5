"""The conformance checks, as nine scripted worker lives sharing one checkpoint directory.

Life 1 (fresh): hello, telemetry, commands, checkpoint, malformed frames, unknown fields, a multi-part message,
holding, checkpoint_exit.
Life 2: resume from life 1's checkpoint with another batch, then silence (lost daemon).
Life 3: SIGTERM, then the number of checkpoints kept. Lives 4-7 (``duties``): a slow load and SIGTERM before the
hello; no welcome; a damaged newest checkpoint, a ``.trash`` to restore and a dying parent; a long step, keepalives
and the orphan watchdog. Life 8: run to the end. Life 9: resume at the target.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import msgpack

from protocol.checkpoints import list_checkpoints, step_of
from protocol.conformance import duties
from protocol.conformance.harness import JOB, Abort, Harness, Life, Options
from protocol.conformance.script import (
    Report,
    Result,
    State,
    exit_problems,
    leaves,
    leaves_orphaned,
    not_done,
    read_hello,
    start,
)
from protocol.messages import (
    EXIT_CHECKPOINTED,
    FINISHED,
    CheckpointSaved,
    Command,
    Goodbye,
    Heartbeat,
    Hello,
    Step,
    Steps,
    encode,
)

CHECKS: dict[str, str] = {
    "hello": "first frame is hello with the spawn token, its pid, the job, batch and accum of the environment",
    "step_telemetry": "step frames: consecutive steps, batch and accum, step_seconds in seconds, footprint in bytes",
    "commands_at_step_boundaries": "a checkpoint command is done between steps: at the last step reported, "
                                   "and training goes on at the next",
    "checkpoint_valid": "the checkpoint is complete when announced: renamed into place, meta.json lists every "
                        "file with its size and sha256 (fsync itself cannot be seen from outside)",
    "malformed_frames_survived": "garbage, wrong versions, unknown types and actions, bad field types are dropped "
                                 "without acting on them",
    "unknown_fields_ignored": "frames with unknown extra fields are honoured",
    "multipart_refused": "a two-part message whose first part is a valid checkpoint_exit is dropped whole",
    "holding": "with holding granted: steps frames of at most hold_rows rows, none held past hold; at a command "
               "the held steps come before checkpoint_saved, then one step frame per step until the next heartbeat",
    "checkpoint_exit": "checkpoint_exit: checkpoint_saved, goodbye with the command's reason, exit 75",
    "resume": "the next life resumes at the checkpoint's step with the environment's batch and accum",
    "lost_daemon": "without heartbeats: checkpoint, goodbye daemon_silent/daemon_lost, exit 75",
    "sigterm": "SIGTERM to the group: checkpoint, goodbye, exit 75 within kill_grace",
    "keep_checkpoints": "at most MLXSUP_KEEP_CHECKPOINTS checkpoints are kept, the newest among them",
    "heartbeats_before_hello": f"during a slow load ({duties.LOAD_ENV}): heartbeats with the token at most "
                               f"{duties.BEAT_GAP:g} s apart, and no other frame",
    "sigterm_before_hello": "SIGTERM during that load: exit 75 within kill_grace, nothing sent, no checkpoint",
    "no_welcome": "a spawn token the kit does not accept, so the hello gets no answer: the worker trains anyway, "
                  "in version 1 frames, and leaves as daemon_silent after MLXSUP_ORPHAN_TIMEOUT: checkpoint, goodbye, "
                  "exit 75",
    "damaged_newest_skipped": "a damaged newest checkpoint is passed over on load and left on disk",
    "trash_restored": "a .trash-ckpt of a dead writer whose ckpt is missing is renamed back and resumed from",
    "parent_died": "the parent process dies while heartbeats go on: checkpoint, goodbye daemon_lost, exit 75",
    "keepalive_long_step": f"during a long step ({duties.SLOW_EVERY_ENV}, {duties.SLOW_SECONDS_ENV}): heartbeats "
                           f"at most {duties.BEAT_GAP:g} s apart",
    "orphan_watchdog": "silence during that long step: the worker ends itself mid-step (exit 75, no goodbye) "
                       "within 2 × MLXSUP_ORPHAN_TIMEOUT + 1 s of the last heartbeat",
    "finish": "running to target_steps: final checkpoint, goodbye finished, exit 0",
    "resume_at_target": "resuming at target_steps: no step frame, goodbye finished at that step, exit 0",
}
TIMING_WINDOW = 1.0  # seconds of steps over which step_seconds must add up to the wall time
NEEDS = {"resume": {"checkpoint_exit"}, "keep_checkpoints": {"checkpoint_exit", "lost_daemon", "sigterm"},
         "resume_at_target": {"finish"}, "damaged_newest_skipped": {"checkpoint_exit"},
         "trash_restored": {"checkpoint_exit"}, "parent_died": {"checkpoint_exit"}}
_BAD_FRAMES: list[tuple[bytes, ...]] = [
    (b"\xc1",), (b"",), (b"not msgpack at all",), (msgpack.packb([1, "command", "checkpoint_exit"]),),
    (msgpack.packb({"v": 99, "t": "command", "action": "checkpoint_exit", "reason": "v99"}),),
    (msgpack.packb({"v": 1}),), (msgpack.packb({"v": 1, "t": "rewind", "step": 0}),),
    (msgpack.packb({"v": 1, "t": "command", "action": "self_destruct", "reason": ""}),),
    (msgpack.packb({"v": 1, "t": "command", "action": "checkpoint_exit"}),),
    (msgpack.packb({"v": 1, "t": "command", "action": "checkpoint", "reason": 5}),),
    (msgpack.packb({"v": 1, "t": "command", "action": "checkpoint_exit", "reason": "x" * 5000}),),
    (msgpack.packb({"v": 1, "t": "heartbeat", "sent_at": "soon"}),),
    (msgpack.packb({"v": 1, "t": "command", "action": "checkpoint"}), b"second part"),
]


def _check_hello(life: Life, report: Report, options: Options) -> Hello:
    report.begin("hello")
    hello = read_hello(life, options)
    problems = []
    if hello.token != life.token:
        problems.append("token does not match MLXSUP_TOKEN")
    try:
        in_group = os.getpgid(hello.pid) == life.pid
    except OSError:
        in_group = False
    if not in_group:
        problems.append(f"pid {hello.pid} is not the worker's process (nor in its process group {life.pid})")
    if hello.job != JOB:
        problems.append(f"job {hello.job!r} is not MLXSUP_JOB {JOB!r}")
    if hello.start_step != 0:
        problems.append(f"start_step {hello.start_step} with an empty checkpoint directory")
    if (hello.batch, hello.accum) != (int(life.env["MLXSUP_BATCH"]), int(life.env["MLXSUP_ACCUM"])):
        problems.append(f"batch×accum {hello.batch}×{hello.accum} is not the environment's "
                        f"{life.env['MLXSUP_BATCH']}×{life.env['MLXSUP_ACCUM']}")
    if hello.target_steps <= hello.start_step:
        problems.append(f"target_steps {hello.target_steps} leaves nothing to train")
    report.record("hello", problems, f"token ok, pid {hello.pid}, batch×accum {hello.batch}×{hello.accum}, "
                                     f"target {hello.target_steps}, protocol {hello.protocol}")
    return hello


def _check_telemetry(life: Life, report: Report, options: Options, hello: Hello) -> None:
    report.begin("step_telemetry")
    items: list[tuple[float, Step]] = []
    rss: list[int] = []
    for _ in range(6):
        items.extend(life.steps(1, options.timeout))
        rss.append(life.rss())
    while items[-1][0] - items[0][0] < TIMING_WINDOW and len(items) < 200:
        items.extend(life.steps(1, options.timeout))  # a window long enough to outweigh our own scheduling
    steps = [step for _, step in items]
    problems = []
    numbers = [s.step for s in steps]
    expected = list(range(hello.start_step + 1, hello.start_step + 1 + len(steps)))
    if numbers != expected:
        problems.append(f"steps {numbers[:8]}...: expected consecutive steps from {expected[0]}")
    if any((s.batch, s.accum) != (hello.batch, hello.accum) for s in steps):
        problems.append("batch or accum differ from the hello's")
    if any(not s.step_seconds > 0 or (s.tokens_per_second or 0.0) < 0 for s in steps):
        problems.append("step_seconds must be > 0 and tokens_per_second >= 0")
    wall = items[-1][0] - items[0][0]
    reported = sum(s.step_seconds for s in steps[1:])
    if not abs(reported - wall) <= 0.5 * wall + 0.25:
        problems.append(f"step_seconds add up to {reported:.3f} over {wall:.3f} s of wall time: seconds expected")
    sampled = steps[: len(rss)]
    ratios = [s.footprint / r for s, r in zip(sampled, rss, strict=True) if r]
    if not ratios or not all(0.25 <= x <= 4 for x in ratios):
        problems.append(f"footprint {sampled[-1].footprint} vs resident set {rss[-1]}: bytes of the worker expected")
    if any(s.mlx_peak and (s.mlx_active or 0) > s.mlx_peak for s in steps):
        problems.append("mlx_peak below mlx_active: the peak since the previous step cannot be below it")
    mean_ms = 1000 * sum(s.step_seconds for s in steps) / len(steps)
    report.record("step_telemetry", problems, f"steps {numbers[0]}..{numbers[-1]}, {mean_ms:.1f} ms/step, "
                                              f"footprint {steps[-1].footprint / 2**20:.0f} MiB ≈ resident set")


def _check_commands(life: Life, report: Report, options: Options) -> CheckpointSaved:
    report.begin("commands_at_step_boundaries")
    life.send(Command(Command.CLEAR_CACHE, "conformance"))
    seen = life.last_step() or 0
    life.send(Command(Command.CHECKPOINT, "conformance"))
    saved = life.expect_a(CheckpointSaved, "checkpoint_saved after a checkpoint command", options.timeout,
                          refuse=not_done)
    boundary = life.last_step()
    after = life.steps(1, options.timeout)[0][1]
    problems = []
    if saved.step != boundary:
        problems.append(f"checkpoint of step {saved.step} announced after step {boundary}: not at a boundary")
    if saved.step < seen:
        problems.append(f"checkpoint of step {saved.step} predates the command (sent after step {seen})")
    if after.step != saved.step + 1:
        problems.append(f"training went on at step {after.step}, expected {saved.step + 1}")
    report.record("commands_at_step_boundaries", problems,
                  f"command sent after step {seen}, checkpoint at step {saved.step}, next step {after.step}")
    report.begin("checkpoint_valid")
    verified = life.verified[saved.step]
    report.record("checkpoint_valid", [] if verified.ok else [verified.detail], verified.detail)
    return saved


def _check_robustness(life: Life, report: Report, options: Options) -> None:
    report.begin("malformed_frames_survived")
    for parts in _BAD_FRAMES:
        life.send_raw(*parts)
    # A valid command right behind them: its checkpoint must be the only effect. A worker that acted on an
    # invalid frame (most of them ask for checkpoint_exit) shows a second checkpoint or a goodbye here.
    life.send(Command(Command.CHECKPOINT, "fence"))
    life.expect_a(CheckpointSaved, "checkpoint_saved for a valid command after the malformed frames",
                  options.timeout, refuse=not_done)
    life.steps(3, options.timeout)  # refuses a checkpoint or goodbye caused by an invalid frame
    report.record("malformed_frames_survived", [],
                  f"{len(_BAD_FRAMES)} malformed frames dropped, next valid command honoured")
    report.begin("unknown_fields_ignored")
    life.send_raw(msgpack.packb({"v": 1, "t": "heartbeat", "sent_at": time.time(), "future": [1, {"a": 2}]}))
    life.send_raw(msgpack.packb({"v": 1, "t": "command", "action": "checkpoint", "reason": "conformance",
                                 "deadline": 30.0, "x-extra": {"nested": True}}))
    saved = life.expect_a(CheckpointSaved, "checkpoint_saved for a command with unknown fields",
                          options.timeout, refuse=not_done)
    report.record("unknown_fields_ignored", [], f"command with unknown fields honoured (step {saved.step})")
    report.begin("multipart_refused")
    before = life.last_step() or 0
    life.send_raw(encode(Command(Command.CHECKPOINT_EXIT, "multipart")), encode(Heartbeat(time.time())))
    life.send(Command(Command.CHECKPOINT, "fence"))  # its checkpoint must be the only effect
    fenced = life.expect_a(CheckpointSaved, "checkpoint_saved for a valid command after a multi-part message",
                           options.timeout, refuse=not_done)
    life.steps(3, options.timeout)  # refuses the goodbye of a worker that acted on the first part
    report.record("multipart_refused", [], f"2-part message (valid checkpoint_exit first) sent after step {before}: "
                                           f"dropped; the next command's checkpoint at {fenced.step}, training went on")


def life_one(harness: Harness, report: Report, state: State) -> None:
    options = harness.options
    life = harness.spawn(batch=4, accum=1)
    hello = _check_hello(life, report, options)
    _check_telemetry(life, report, options, hello)
    _check_commands(life, report, options)
    _check_robustness(life, report, options)
    duties.check_holding(life, report, options)
    report.begin("checkpoint_exit")
    life.send(Command(Command.CHECKPOINT_EXIT, "conformance"))
    saved, bye, code, _ = leaves(life, options.timeout, "after checkpoint_exit")
    problems = exit_problems(life, saved, bye, code, EXIT_CHECKPOINTED)
    if bye.reason != "conformance":
        problems.append(f"goodbye reason {bye.reason!r}, expected the command's 'conformance'")
    report.record("checkpoint_exit", problems, f"checkpoint {saved.step}, goodbye {bye.reason!r}, exit {code}")
    state.exit_step = saved.step


def life_two(harness: Harness, report: Report, state: State) -> None:
    options = harness.options
    life, hello = start(harness, report, "resume", batch=2, accum=2)
    first = life.steps(1, options.timeout)[0][1]
    problems = []
    if state.exit_step is None:
        problems.append("no checkpoint to resume from (checkpoint_exit failed)")
    elif hello.start_step != state.exit_step:
        problems.append(f"hello start_step {hello.start_step}, expected the checkpoint's {state.exit_step}")
    if first.step != hello.start_step + 1:
        problems.append(f"first step {first.step} after resuming at {hello.start_step}")
    if {(hello.batch, hello.accum), (first.batch, first.accum)} != {(2, 2)}:
        problems.append(f"batch×accum {first.batch}×{first.accum}, expected the environment's 2×2")
    report.record("resume", problems, f"resumed at step {hello.start_step}, first step {first.step}, 2×2")
    report.begin("lost_daemon")
    life.steps(2, options.timeout)
    life.heartbeats = False
    left = leaves_orphaned(life, harness, options.orphan_timeout + options.timeout, "without heartbeats")
    problems = left.problems
    if left.reason not in ("daemon_silent", "daemon_lost", None):
        problems.append(f"goodbye reason {left.reason!r}, expected daemon_silent or daemon_lost")
    report.record("lost_daemon", problems, f"left {left.took:.1f} s after the last heartbeat (orphan timeout "
                                           f"{options.orphan_timeout:g} s): checkpoint {left.step}, goodbye "
                                           f"{left.reason or 'lost'}, exit {left.code}{left.note()}")
    state.newest = left.step


def life_three(harness: Harness, report: Report, state: State) -> None:
    options = harness.options
    life, hello = start(harness, report, "sigterm", batch=4, accum=1)
    life.steps(2, options.timeout)
    life.signal_group(signal.SIGTERM)
    saved, bye, code, took = leaves(life, options.kill_grace, "after SIGTERM")
    problems = exit_problems(life, saved, bye, code, EXIT_CHECKPOINTED)
    if bye.reason == FINISHED:
        problems.append("goodbye 'finished' after SIGTERM")
    if took > options.kill_grace:
        problems.append(f"took {took:.2f} s, longer than kill_grace {options.kill_grace:g} s")
    if state.newest is not None and hello.start_step != state.newest:
        problems.append(f"resumed at {hello.start_step}, not at the newest checkpoint {state.newest}")
    report.record("sigterm", problems, f"checkpoint {saved.step}, goodbye {bye.reason!r}, exit {code} "
                                       f"{took:.2f} s after SIGTERM")
    report.begin("keep_checkpoints")
    kept = [step_of(path) for path in list_checkpoints(harness.checkpoints)]
    limit = options.keep_checkpoints
    problems = [] if 1 <= len(kept) <= limit and kept[-1] == saved.step else [
        f"kept {kept} with MLXSUP_KEEP_CHECKPOINTS={limit}, newest {saved.step}"]
    report.record("keep_checkpoints", problems, f"kept {kept} (limit {limit})")


def life_four(harness: Harness, report: Report, state: State) -> None:
    options = harness.options
    life, hello = start(harness, report, "finish", batch=4, accum=1)
    bye = life.expect_a(Goodbye, "goodbye at the end of training", options.finish_timeout)
    code = life.wait_exit(options.timeout)
    target = hello.target_steps
    problems = []
    if bye.reason != FINISHED or bye.step != target:
        problems.append(f"goodbye {bye.reason!r} at step {bye.step}, expected 'finished' at {target}")
    if life.last_step() != target:
        problems.append(f"last step frame {life.last_step()}, expected {target}")
    final = life.verified.get(target)
    if final is None or not final.ok:
        problems.append(final.detail if final else f"no checkpoint_saved for the final step {target}")
    if code != 0:
        problems.append(f"exit status {code}, expected 0" if code is not None else "did not exit")
    report.record("finish", problems, f"finished at step {target} with a verified checkpoint, exit 0")


def life_five(harness: Harness, report: Report, state: State) -> None:
    options = harness.options
    life, hello = start(harness, report, "resume_at_target", batch=4, accum=1)
    bye = life.expect_a(Goodbye, "goodbye after resuming at the target", options.timeout,
                        refuse=lambda m: f"{m.TAG} {getattr(m, 'step', '')} after resuming at the target"
                        if isinstance(m, Step | Steps) else "")
    code = life.wait_exit(options.timeout)
    problems = []
    if hello.start_step < hello.target_steps:
        problems.append(f"resumed at {hello.start_step}, not at the finished run's target {hello.target_steps}")
    if bye.reason != FINISHED or bye.step != hello.start_step:
        problems.append(f"goodbye {bye.reason!r} at step {bye.step}, expected 'finished' at {hello.start_step}")
    rewritten = life.verified.get(hello.start_step)
    if rewritten is not None and not rewritten.ok:
        problems.append(rewritten.detail)
    if code != 0:
        problems.append(f"exit status {code}, expected 0" if code is not None else "did not exit")
    rewrite = "checkpoint rewritten" if rewritten else "no checkpoint"
    report.record("resume_at_target", problems, f"resumed at {hello.start_step} = target: no step, goodbye finished "
                                                f"at {bye.step} ({rewrite}), exit {code}")


LIVES: list[tuple[Callable[[Harness, Report, State], None], list[str]]] = [
    (life_one, ["hello", "step_telemetry", "commands_at_step_boundaries", "checkpoint_valid",
                "malformed_frames_survived", "unknown_fields_ignored", "multipart_refused", "holding",
                "checkpoint_exit"]),
    (life_two, ["resume", "lost_daemon"]),
    (life_three, ["sigterm", "keep_checkpoints"]),
    (duties.life_slow_load, ["heartbeats_before_hello", "sigterm_before_hello"]),
    (duties.life_no_welcome, ["no_welcome"]),
    (duties.life_damaged, ["damaged_newest_skipped", "trash_restored", "parent_died"]),
    (duties.life_long_step, ["keepalive_long_step", "orphan_watchdog"]),
    (life_four, ["finish"]),
    (life_five, ["resume_at_target"]),
]


def run_checks(harness: Harness, selected: set[str]) -> list[Result]:
    """Run the lives the selected checks need; results of the selected checks, in CHECKS order."""
    wanted = set(selected)
    for name in selected:
        wanted |= NEEDS.get(name, set())
    report, state = Report(), State()
    for life, names in LIVES:
        if not wanted & set(names):
            continue
        try:
            life(harness, report, state)
        except Abort as exc:
            failed = report.current
            report.results[failed] = Result(failed, False, str(exc))
            report.fail_rest(names, f"not run: {failed} failed")
        finally:
            if harness.lives:
                harness.lives[-1].kill()
    return [report.results[name] for name in CHECKS if name in selected]
