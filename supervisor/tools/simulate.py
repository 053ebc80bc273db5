"""Replay the real supervisor against a synthetic machine: ``python -m supervisor.tools.simulate``.

The scenarios that matter most (a 72 GiB Mac leaking 100 MiB per step for 10,000 steps) do not fit on the
machines the test suite runs on, so this feeds the daemon's own job lifecycle (``supervisor.core.lifecycle``:
the escalation, the consecutive over-budget count, the kill ceiling, predictive leak recycling, shrinking,
regrowth and its back-off, the restart ladder and FATAL after ``--max-attempts`` lives without a newer
checkpoint) with the events of a synthetic worker and clock. Only the worker is simulated here; there is no
copy of any decision. Deterministic for a given ``--seed`` (the seed only feeds the noise).

The synthetic job, per worker life (a restart reclaims everything; the leak does not depend on the batch):

* memory: in the k-th step of a life (k = 1, 2, ...), sample i of n (``--samples-per-step``) reads
  ``baseline + leak * (k - 1 + i/n) + peak_per_sample * batch`` plus gaussian noise (``--noise-mb``); the
  footprint at the end of the step, sent with the step's telemetry, is ``baseline + leak * k`` plus noise.
  The highest sample of a step is thus ``baseline + leak * k + transient``. Like the real worker, the step
  also reports the transient as MLX's in-step peak over active memory.
* time: a step costs ``per_sample * batch * accum + micro_overhead * accum``, where ``per_sample`` makes a
  step at the configured batch take ``--step-seconds``: the same work per optimizer step whatever the
  split, plus a little overhead per micro-batch. Every restart (checkpoint, exit, spawn, restore; or kill,
  spawn, restore) costs ``--restart-seconds``; periodic checkpoints are free.
* commands reach the worker at its next step boundary: after a sample, the end of the current step; after
  a step's telemetry, the end of the following step. The worker then checkpoints and exits, and the next
  life resumes from that checkpoint. A sample at or over the kill ceiling kills the worker on the spot: the
  steps since its last checkpoint (periodic, every ``--checkpoint-every``) are lost and redone.

Figures: ``goodput`` is the time of the steps that count towards the final model (done once and
checkpointed) over the wall time; ``efficiency`` is the steps kept times the step time at the configured
batch over the wall time (1.0 would be an uninterrupted run at the configured batch), so it also charges
the cost of running at a smaller batch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import signal
import sys
from collections.abc import Sequence
from typing import Any

from protocol import Command, Hello, Step
from protocol.messages import EXIT_CHECKPOINTED
from supervisor.core import events as ev
from supervisor.core.lifecycle import Lifecycle, Settings
from supervisor.core.policy import Limits, PolicyConfig
from supervisor.core.sizes import SizeError, format_bytes, parse_budget, parse_bytes, parse_fraction_of
from supervisor.core.states import TERMINAL_STATES, JobState

MiB = 1024 * 1024
POLICIES = ("adaptive", "shrink-only", "stop")
HISTORY_CAP = 200  # batch_history entries listed; changes past that are only counted (batch_changes)


@dataclasses.dataclass(frozen=True)
class Scenario:
    """A synthetic machine and job: sizes in bytes, rates in bytes per step or sample, times in seconds."""

    memory: int
    limits: Limits
    baseline: int
    leak_per_step: float
    peak_per_sample: float
    steps: int
    batch: int
    accum: int = 1
    min_batch: int = 1
    step_seconds: float = 0.5
    micro_overhead: float = 0.002
    restart_seconds: float = 3.0
    checkpoint_every: int = 100
    samples_per_step: int = 4
    noise: float = 0.0
    seed: int = 0
    max_attempts: int = 5
    leak_threshold: float = 1.0 * MiB
    regrow_after_steps: int = 50
    min_steps_per_life: int = 10
    shrink_factor: float = 0.5
    keep_effective_batch: bool = True

    def step_time(self, batch: int, accum: int) -> float:
        """Seconds of one optimizer step split as ``batch`` x ``accum``."""
        per_sample = (self.step_seconds - self.micro_overhead * self.accum) / (self.batch * self.accum)
        return per_sample * batch * accum + self.micro_overhead * accum

    def settings(self, policy: str) -> Settings:
        """The lifecycle settings ``supervisor.daemon.job.settings_of`` builds for such a job under ``policy``."""
        config = PolicyConfig(
            leak_threshold=self.leak_threshold, shrink_factor=self.shrink_factor, min_batch=self.min_batch,
            max_batch=self.batch, keep_effective_batch=self.keep_effective_batch,
            min_steps_per_life=self.min_steps_per_life, regrow_after_steps=self.regrow_after_steps,
            adaptive=policy == "adaptive",
        )
        return Settings(policy=config, mode=policy, batch=self.batch, accum=self.accum,
                        max_attempts=self.max_attempts)


@dataclasses.dataclass
class Result:
    """The outcome of one policy over one scenario (``to_json`` is the ``--json`` object)."""

    policy: str
    steps_target: int
    budget_bytes: int
    warn_bytes: int
    kill_bytes: int
    outcome: str = ""  # finished | fatal | stopped
    reason: str = ""
    steps_completed: int = 0  # the newest checkpoint: what the final model holds
    steps_lost: int = 0  # steps done and then lost to kills
    goodput: float = 0.0
    efficiency: float = 0.0
    wall_seconds: float = 0.0
    useful_seconds: float = 0.0
    restarts: int = 0
    restart_reasons: dict[str, int] = dataclasses.field(default_factory=dict)
    batch_reductions: int = 0
    batch_changes: int = 0
    batch_history: list[list[int]] = dataclasses.field(default_factory=list)
    first_breach_step: int | None = None
    max_memory_bytes: int = 0
    samples: int = 0
    samples_over_budget: int = 0
    samples_over_kill: int = 0

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of every field, times and ratios rounded for reading."""
        data = dataclasses.asdict(self)
        data.update(goodput=round(self.goodput, 4), efficiency=round(self.efficiency, 4),
                    wall_seconds=round(self.wall_seconds, 3), useful_seconds=round(self.useful_seconds, 3))
        return data


@dataclasses.dataclass
class _Worker:
    """The simulated process of one life: what the synthetic job does, not what the supervisor decides."""

    life: int
    batch: int
    accum: int
    step: int  # the step it resumed from, then the last step it finished
    age: int = 0  # steps done in this life: how much it has leaked
    exit_at: int = 0  # step at whose boundary it checkpoints and exits (0: not asked)
    killed: bool = False


class Simulation:
    """One policy over one scenario: a synthetic worker and clock around the daemon's own Lifecycle.

    Only the synthetic worker lives here; every decision (escalation, restart ladder, batch, regrowth, giving
    up) comes from ``supervisor.core.lifecycle.Lifecycle``, the class the daemon runs.
    """

    def __init__(self, scenario: Scenario, policy: str) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy {policy!r}: expected one of {', '.join(POLICIES)}")
        self.scenario = scenario
        self.policy = policy
        self.lifecycle = Lifecycle(scenario.settings(policy), scenario.limits)
        self.rng = random.Random(scenario.seed)
        limits = scenario.limits
        self.result = Result(policy, scenario.steps, limits.budget, limits.warn, limits.kill)
        self.now = 0.0  # the simulated wall clock
        self.checkpoint = 0  # newest checkpoint step
        self.unsaved = 0.0  # seconds of steps done since the newest checkpoint
        self.worker: _Worker | None = None
        self.spawns = 0
        self.last_batch: tuple[int, int] | None = None
        self.reason = ""

    def run(self) -> Result:
        """Simulate until the job finishes, stops or gives up."""
        self._feed(ev.Start(self.now, "simulate"))
        while self.lifecycle.state not in TERMINAL_STATES:
            if self.worker is not None:
                self._run_life(self.worker)
            elif self.lifecycle.state == JobState.BACKOFF:
                self.now = max(self.now, self.lifecycle.retry_at)
                self._feed(ev.Tick(self.now, self.scenario.memory, 0))
            else:  # pragma: no cover - every other state has a worker or is terminal here
                raise RuntimeError(f"simulation stuck in {self.lifecycle.state.name}")
        self._finish()
        return self.result

    def _finish(self) -> None:
        result, stats, scenario = self.result, self.lifecycle.stats, self.scenario
        result.outcome = {JobState.FINISHED: "finished", JobState.FATAL: "fatal"}.get(self.lifecycle.state,
                                                                                       "stopped")
        result.reason = self.reason
        result.steps_completed = self.checkpoint
        result.restarts = stats.restarts
        result.restart_reasons = dict(stats.restart_reasons)
        result.first_breach_step = stats.first_breach_step
        result.max_memory_bytes = stats.max_sampled
        result.samples, result.samples_over_budget = stats.samples, stats.samples_over_budget
        result.samples_over_kill = stats.samples_over_kill
        result.wall_seconds = self.now
        if self.now > 0:
            result.goodput = result.useful_seconds / self.now
            result.efficiency = self.checkpoint * scenario.step_time(scenario.batch, scenario.accum) / self.now

    # -- the lifecycle and its actions --------------------------------------------------------------

    def _feed(self, event: ev.Event) -> None:
        for action in self.lifecycle.handle(event):
            if isinstance(action, ev.Spawn):
                self._spawn(action)
            elif isinstance(action, ev.Send) and action.action == Command.CHECKPOINT_EXIT:
                if self.worker is not None and not self.worker.exit_at:
                    self.worker.exit_at = self.worker.step + 1  # the boundary it reaches next
            elif isinstance(action, ev.Signal) and self.worker is not None and action.life == self.worker.life:
                self.worker.killed = True  # killed on the spot, unsaved steps lost
            elif isinstance(action, ev.StateChanged):
                self.reason = action.reason

    def _spawn(self, action: ev.Spawn) -> None:
        if self.spawns:
            self.now += self.scenario.restart_seconds
        self.spawns += 1
        worker = _Worker(action.life, action.batch, action.accum, self.checkpoint)
        self.worker = worker
        self._note_batch(worker)
        self._feed(ev.Spawned(action.life, self.now, 10_000 + action.life, self.checkpoint))
        self._feed(ev.HelloIn(self.now, Hello("", 10_000 + action.life, "simulated", self.checkpoint,
                                              self.scenario.steps, action.batch, action.accum)))

    # -- the synthetic worker -----------------------------------------------------------------------

    def _run_life(self, worker: _Worker) -> None:
        """Steps of one life until it finishes, leaves at a boundary, or is killed."""
        scenario = self.scenario
        while self.worker is worker:
            step = worker.step + 1
            if not self._run_step(worker, step):
                self.result.steps_lost += step - 1 - self.checkpoint
                self.unsaved = 0.0
                self._exit(worker, -signal.SIGTERM)
                return
            worker.step = step
            self._feed(self._telemetry(worker, step))
            # As worker.Session.end_step: an exit asked for at the target step is moot (it finishes anyway).
            leaving = 0 < worker.exit_at <= step < scenario.steps
            periodic = scenario.checkpoint_every > 0 and step % scenario.checkpoint_every == 0
            if leaving or periodic or step == scenario.steps:
                self._save(step)
            if step == scenario.steps:
                self._feed(ev.GoodbyeIn(self.now, "finished", step, self.checkpoint))
                self._exit(worker, 0)
            elif leaving:
                self._feed(ev.GoodbyeIn(self.now, "asked", step, self.checkpoint))
                self._exit(worker, EXIT_CHECKPOINTED)
            elif worker.killed:
                self._exit(worker, -signal.SIGTERM)

    def _exit(self, worker: _Worker, code: int) -> None:
        """The process is gone (its teardown takes no simulated time)."""
        if self.lifecycle.life is not None and self.lifecycle.life.id == worker.life:
            self.worker = None
            self._feed(ev.Exited(self.now, code, self.checkpoint))
        else:  # it said goodbye and departed: its successor may already be waiting for its memory
            if self.worker is worker:
                self.worker = None
            self._feed(ev.DepartedExited(self.now, worker.life, code))

    def _run_step(self, worker: _Worker, step: int) -> bool:
        """The samples of one optimizer step; False when one got the worker killed."""
        scenario = self.scenario
        worker.age += 1
        transient = int(scenario.peak_per_sample * worker.batch)
        start = scenario.baseline + scenario.leak_per_step * (worker.age - 1)
        seconds = scenario.step_time(worker.batch, worker.accum)
        count = scenario.samples_per_step
        for i in range(1, count + 1):
            sampled = max(0, int(start + scenario.leak_per_step * i / count) + transient + self._noise())
            self._feed(ev.Sample(self.now + seconds * i / count, sampled, True, {}, scenario.memory, 0))
            if worker.killed:
                self.now += seconds * i / count
                return False
        self.now += seconds
        self.unsaved += seconds
        return True

    def _telemetry(self, worker: _Worker, step: int) -> ev.StepIn:
        scenario = self.scenario
        level = max(0, int(scenario.baseline + scenario.leak_per_step * worker.age) + self._noise())
        transient = int(scenario.peak_per_sample * worker.batch)
        seconds = scenario.step_time(worker.batch, worker.accum)
        # Like the real worker, the step reports its transient as MLX's in-step peak over active memory.
        return ev.StepIn(self.now, Step(step, worker.batch, worker.accum, 0.0, seconds, level, 0, level + transient,
                                        level))

    def _save(self, step: int) -> None:
        """A durable checkpoint at ``step``: the steps since the previous one now count."""
        self.checkpoint = step
        self.result.useful_seconds += self.unsaved
        self.unsaved = 0.0

    def _note_batch(self, worker: _Worker) -> None:
        """Batch history per life (a life keeps one batch), bounded to HISTORY_CAP entries."""
        result = self.result
        current = (worker.batch, worker.accum)
        if current == self.last_batch:
            return
        if self.last_batch is not None:
            result.batch_changes += 1
            result.batch_reductions += worker.batch < self.last_batch[0]
        self.last_batch = current
        if len(result.batch_history) < HISTORY_CAP:
            result.batch_history.append([worker.step, worker.batch, worker.accum])

    def _noise(self) -> int:
        return int(self.rng.gauss(0.0, self.scenario.noise)) if self.scenario.noise > 0 else 0


def simulate(scenario: Scenario, policy: str) -> Result:
    """Run ``policy`` (one of POLICIES) over ``scenario``."""
    return Simulation(scenario, policy).run()


# -- command line ------------------------------------------------------------------------------------------


_SIZES = {  # option: (default, help); parsed with supervisor.core.sizes
    "memory": ("72GiB", "total memory of the machine"),
    "budget": ("85%", "bytes, percent of --memory or 'total - 8GiB'"),
    "warn": ("85%", "warn band: percent of the budget or bytes"),
    "kill": ("110%", "kill ceiling: percent of the budget or bytes"),
    "baseline": ("4GiB", "footprint of a fresh worker"),
    "leak_threshold": ("1MiB", "growth per step above which a breach is a leak"),
}
_NUMBERS: dict[str, tuple[type, float, float, str]] = {  # option: (type, default, minimum, help)
    "leak_mb": (float, 100.0, 0, "MiB leaked per step, whatever the batch"),
    "peak_mb_per_sample": (float, 0.0, 0, "MiB of in-step working set per sample of the batch"),
    "noise_mb": (float, 0.0, 0, "standard deviation of gaussian noise on every reading, MiB"),
    "steps": (int, 10000, 1, "optimizer steps to train"),
    "batch": (int, 64, 1, "configured micro-batch"),
    "accum": (int, 1, 1, "configured gradient accumulation"),
    "min_batch": (int, 1, 1, "smallest batch a shrink may reach"),
    "step_seconds": (float, 0.5, 0, "seconds per optimizer step at the configured batch"),
    "micro_overhead_s": (float, 0.002, 0, "fixed seconds per micro-batch"),
    "restart_seconds": (float, 3.0, 0, "checkpoint + exit + spawn + restore, seconds"),
    "checkpoint_every": (int, 100, 0, "steps between periodic checkpoints (0: never)"),
    "samples_per_step": (int, 4, 1, "footprint samples during each step"),
    "max_attempts": (int, 5, 1, "lives without a newer checkpoint before FATAL"),
    "regrow_after_steps": (int, 50, 0, "healthy steps before trying a larger batch"),
    "min_steps_per_life": (int, 10, 0, "recycling sooner than this also shrinks the batch"),
    "shrink_factor": (float, 0.5, 0, "batch multiplier on a peak breach (between 0 and 1)"),
    "seed": (int, 0, 0, "seed of the noise"),
}


# Options that are Scenario fields under the same name and unit.
_SAME_NAMES = ("steps", "batch", "accum", "min_batch", "step_seconds", "restart_seconds", "checkpoint_every",
               "samples_per_step", "seed", "max_attempts", "regrow_after_steps", "min_steps_per_life",
               "shrink_factor", "keep_effective_batch")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m supervisor.tools.simulate`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m supervisor.tools.simulate",
        description="Replay the supervisor's policy against a synthetic machine and job (see pydoc).",
    )
    for name, (text, what) in _SIZES.items():
        parser.add_argument(_flag(name), default=text, help=f"{what} (default {text})".replace("%", "%%"))
    for name, (kind, default, _, what) in _NUMBERS.items():
        parser.add_argument(_flag(name), type=kind, default=default, help=f"{what} (default {default:g})")
    parser.add_argument("--no-keep-effective-batch", dest="keep_effective_batch", action="store_false",
                        help="shrink the batch without raising the accumulation")
    parser.add_argument("--policy", choices=POLICIES, default="adaptive", help="policy (default adaptive)")
    parser.add_argument("--compare", action="store_true", help="run every policy, print them side by side")
    parser.add_argument("--json", action="store_true", help="print JSON (with --compare: {policy: result})")
    return parser


def _check_numbers(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """parser.error (exit 2) naming the first option whose value cannot describe a job."""
    for name, (kind, _, minimum, _) in _NUMBERS.items():
        value = getattr(args, name)
        if not math.isfinite(value) or value < minimum:
            what = "a finite number" if kind is float else "a whole number"
            parser.error(f"argument {_flag(name)}: {value} must be {what} >= {minimum:g}")
    if not 0 < args.shrink_factor < 1:
        parser.error(f"argument --shrink-factor: {args.shrink_factor} must be between 0 and 1")
    if args.min_batch > args.batch:
        parser.error(f"argument --min-batch: {args.min_batch} is above --batch {args.batch}")
    if args.step_seconds <= args.micro_overhead_s * args.accum:
        parser.error(f"argument --step-seconds: {args.step_seconds} must exceed --micro-overhead-s x --accum "
                     f"({args.micro_overhead_s} x {args.accum})")


def _size(parser: argparse.ArgumentParser, flag: str, text: str, parse: Any, *base: int) -> int:
    try:
        return int(parse(text, *base))
    except SizeError as exc:
        parser.error(f"argument {flag}: {exc}")


def scenario_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Scenario:
    """Validate ``args`` (errors name the option and its value) and build the scenario."""
    _check_numbers(parser, args)
    memory = _size(parser, "--memory", args.memory, parse_bytes)
    if memory == 0:
        parser.error(f"argument --memory: {args.memory!r} must be above zero")
    budget = _size(parser, "--budget", args.budget, parse_budget, memory)
    limits = Limits(_size(parser, "--warn", args.warn, parse_fraction_of, budget), budget,
                    _size(parser, "--kill", args.kill, parse_fraction_of, budget))
    if not limits.warn <= limits.budget < limits.kill:
        parser.error(f"arguments --warn {args.warn!r} / --kill {args.kill!r}: need warn <= budget < kill, "
                     f"got {limits.warn} / {limits.budget} / {limits.kill} bytes")
    return Scenario(
        memory=memory, limits=limits, baseline=_size(parser, "--baseline", args.baseline, parse_bytes),
        leak_per_step=args.leak_mb * MiB, peak_per_sample=args.peak_mb_per_sample * MiB,
        micro_overhead=args.micro_overhead_s, noise=args.noise_mb * MiB,
        leak_threshold=float(_size(parser, "--leak-threshold", args.leak_threshold, parse_bytes)),
        **{name: getattr(args, name) for name in _SAME_NAMES},
    )


_COLUMNS = ("policy", "outcome", "steps", "goodput", "efficiency", "restarts", "shrinks", "final batch",
            "max memory", ">budget", ">kill", "wall")


def _row(result: Result) -> list[str]:
    history = result.batch_history
    final = f"{history[-1][1]}x{history[-1][2]}" if len(history) == result.batch_changes + 1 else "?"
    return [
        result.policy, result.outcome, f"{result.steps_completed}/{result.steps_target}",
        f"{result.goodput:.3f}", f"{result.efficiency:.3f}", str(result.restarts),
        str(result.batch_reductions), final, format_bytes(result.max_memory_bytes),
        str(result.samples_over_budget), str(result.samples_over_kill), f"{result.wall_seconds:,.0f} s",
    ]


def format_table(scenario: Scenario, results: Sequence[Result]) -> str:
    """The scenario in one line, then one aligned row per result."""
    limits = scenario.limits
    header = (
        f"memory {format_bytes(scenario.memory)}, budget {format_bytes(limits.budget)} "
        f"(warn {format_bytes(limits.warn)}, kill {format_bytes(limits.kill)}), "
        f"baseline {format_bytes(scenario.baseline)}, leak {scenario.leak_per_step / MiB:g} MiB/step, "
        f"peak {scenario.peak_per_sample / MiB:g} MiB/sample, batch {scenario.batch}x{scenario.accum}, "
        f"{scenario.steps} steps of {scenario.step_seconds:g} s"
    )
    rows = [list(_COLUMNS), *(_row(r) for r in results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    reasons = [f"{r.policy}: {r.reason}" for r in results if r.outcome != "finished"]
    return "\n".join([header, "", *lines, *(["", *reasons] if reasons else [])])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; 0 when every simulated policy finished, 1 otherwise, 2 on a usage error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    scenario = scenario_from_args(parser, args)
    policies = POLICIES if args.compare else (args.policy,)
    results = [simulate(scenario, policy) for policy in policies]
    if args.json:
        data = {r.policy: r.to_json() for r in results} if args.compare else results[0].to_json()
        print(json.dumps(data))
    else:
        print(format_table(scenario, results))
    return 0 if all(r.outcome == "finished" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
