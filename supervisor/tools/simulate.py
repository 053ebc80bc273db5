"""Replay the real supervisor policy against a synthetic machine: ``python -m supervisor.tools.simulate``.

The scenarios that matter most (a 72 GiB Mac leaking 100 MiB per step for 10,000 steps) do not fit on the
machines the test suite runs on, so this drives the very functions the daemon uses (``supervisor.core.policy``'s
``Estimator``, ``on_sample`` and ``on_step``) with the same glue as ``supervisor.daemon.job.Job``: the consecutive
over-budget count, the kill ceiling, checkpoint-and-exit restarting at the decided batch, predictive leak
recycling, regrowth, and FATAL after ``--max-attempts`` lives without a newer checkpoint. Deterministic for
a given ``--seed`` (the seed only feeds the noise).

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
import collections
import dataclasses
import json
import math
import random
import sys
from collections.abc import Sequence
from typing import Any

from supervisor.core.policy import Action, Decision, Diagnosis, Estimator, Limits, PolicyConfig, on_sample, on_step
from supervisor.core.sizes import SizeError, format_bytes, parse_budget, parse_bytes, parse_fraction_of

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

    def step_time(self, batch: int, accum: int) -> float:
        """Seconds of one optimizer step split as ``batch`` x ``accum``."""
        per_sample = (self.step_seconds - self.micro_overhead * self.accum) / (self.batch * self.accum)
        return per_sample * batch * accum + self.micro_overhead * accum

    def policy_config(self, policy: str) -> PolicyConfig:
        """The tunables ``supervisor.daemon.job.policy_config`` builds for such a job under ``policy``."""
        return PolicyConfig(
            leak_threshold=self.leak_threshold, min_batch=self.min_batch, max_batch=self.batch,
            min_steps_per_life=self.min_steps_per_life, regrow_after_steps=self.regrow_after_steps,
            adaptive=policy == "adaptive",
        )


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
class _Life:
    """One simulated worker process, with the fields of ``supervisor.daemon.job.Life`` the policy needs."""

    start_checkpoint: int
    batch: int
    accum: int
    estimator: Estimator
    last_step: int = 0
    age: int = 0  # steps done in this life: how much it has leaked
    healthy_steps: int = 0
    over_count: int = 0
    running: bool = True  # False once asked to exit (the job is CHECKPOINTING) or killed
    pending: Decision | None = None
    exit_at: int = 0  # step at whose boundary the worker checkpoints and exits (0: not asked)
    killed: bool = False


class Simulation:
    """One policy over one scenario, following ``supervisor.daemon.job.Job`` wherever a simulated worker can go."""

    def __init__(self, scenario: Scenario, policy: str) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy {policy!r}: expected one of {', '.join(POLICIES)}")
        self.scenario = scenario
        self.policy = policy
        self.config = scenario.policy_config(policy)
        self.rng = random.Random(scenario.seed)
        limits = scenario.limits
        self.result = Result(policy, scenario.steps, limits.budget, limits.warn, limits.kill)
        self.reasons: collections.Counter[str] = collections.Counter()
        self.batch, self.accum = scenario.batch, scenario.accum
        self.checkpoint = 0  # newest checkpoint step
        self.failures = 0  # consecutive lives without a newer checkpoint
        self.unsaved = 0.0  # seconds of steps done since the newest checkpoint
        self.last_batch: tuple[int, int] | None = None

    def run(self) -> Result:
        """Simulate lives until the job finishes, stops or gives up."""
        result = self.result
        while not result.outcome:
            life = _Life(self.checkpoint, self.batch, self.accum, Estimator(self.config))
            self._note_batch(life)
            finished = self._run_life(life)
            self._on_exit(life, finished)
        scenario = self.scenario
        result.steps_completed = self.checkpoint
        result.restart_reasons = dict(self.reasons)
        if result.wall_seconds > 0:
            result.goodput = result.useful_seconds / result.wall_seconds
            ideal = self.checkpoint * scenario.step_time(scenario.batch, scenario.accum)
            result.efficiency = ideal / result.wall_seconds
        return result

    def _run_life(self, life: _Life) -> bool:
        """Steps of one life; True when it finished the job, False when it exited or was killed."""
        scenario = self.scenario
        step = life.start_checkpoint
        while step < scenario.steps:
            step += 1
            if not self._run_step(life, step):
                self.result.steps_lost += step - 1 - self.checkpoint
                self.unsaved = 0.0
                return False
            # As worker.Session.end_step: an exit asked for at the target step is moot (it finishes anyway).
            leaving = 0 < life.exit_at <= step < scenario.steps
            periodic = scenario.checkpoint_every > 0 and step % scenario.checkpoint_every == 0
            if leaving or periodic or step == scenario.steps:
                self._save(step)
            if leaving:
                return False
        return True

    def _run_step(self, life: _Life, step: int) -> bool:
        """One optimizer step: its samples, then its telemetry. False when a sample got the worker killed."""
        scenario = self.scenario
        life.age += 1
        transient = int(scenario.peak_per_sample * life.batch)
        start = scenario.baseline + scenario.leak_per_step * (life.age - 1)
        seconds = scenario.step_time(life.batch, life.accum)
        count = scenario.samples_per_step
        for i in range(1, count + 1):
            self._sample(life, int(start + scenario.leak_per_step * i / count) + transient + self._noise())
            if life.killed:
                self.result.wall_seconds += seconds * i / count
                return False
        self.result.wall_seconds += seconds
        self.unsaved += seconds
        level = max(0, int(start + scenario.leak_per_step) + self._noise())
        # As Job._on_step: estimate, count the step healthy, and decide only while RUNNING.
        life.last_step = step
        life.estimator.observe_step(step, level, transient)
        life.healthy_steps += 1
        if life.running:
            decision = on_step(life.estimator, scenario.limits, life.batch, life.accum, life.healthy_steps,
                               self.config)
            if decision.acts:
                self._act(life, decision)
        return True

    def _sample(self, life: _Life, sampled: int) -> None:
        """As Job.on_sample for a complete sample of ``sampled`` bytes."""
        sampled = max(0, sampled)
        limits, result = self.scenario.limits, self.result
        result.samples += 1
        result.max_memory_bytes = max(result.max_memory_bytes, sampled)
        result.samples_over_budget += sampled > limits.budget
        result.samples_over_kill += sampled > limits.kill
        estimator = life.estimator
        estimator.observe_sample(sampled)
        if sampled >= limits.warn:
            life.healthy_steps = 0
        decision, life.over_count = on_sample(sampled, True, life.over_count, limits, estimator, life.batch,
                                              life.accum, self.config)
        if decision.acts:
            self._act(life, decision)

    def _act(self, life: _Life, decision: Decision) -> None:
        """As Job._act: kill at once, or ask for a checkpoint-and-exit at the next step boundary."""
        if decision.action is Action.CLEAR_CACHE:
            return  # nothing to clear: the model's memory is leak and working set, not MLX cache
        if self.result.first_breach_step is None and decision.diagnosis is not Diagnosis.REGROW:
            self.result.first_breach_step = life.last_step
        if decision.action is Action.KILL:
            life.pending = decision
            life.killed = True
            life.running = False
        elif life.running:
            life.pending = decision
            life.running = False
            life.exit_at = life.last_step + 1  # the boundary the worker reaches next

    def _on_exit(self, life: _Life, finished: bool) -> None:
        """As Job._on_exit: adopt the decided batch, then finish, give up, stop or restart."""
        result = self.result
        progress = self.checkpoint > life.start_checkpoint
        self.failures = 0 if progress else self.failures + 1
        pending = life.pending
        if pending is not None and pending.next_batch:
            self.batch, self.accum = pending.next_batch, pending.next_accum
        if finished:
            result.outcome, result.reason = "finished", "worker finished"
        elif self.failures >= self.scenario.max_attempts:
            last = pending.reason if pending is not None else "exit"
            result.outcome, result.reason = "fatal", f"{self.failures} attempts without progress ({last})"
        elif pending is not None and self.policy == "stop":
            result.outcome, result.reason = "stopped", f"policy 'stop': {pending.reason}"
        else:
            reason = pending.diagnosis.value if pending is not None and pending.diagnosis else "checkpointed"
            self.reasons[reason] += 1
            result.restarts += 1
            result.wall_seconds += self.scenario.restart_seconds

    def _save(self, step: int) -> None:
        """A durable checkpoint at ``step``: the steps since the previous one now count."""
        self.checkpoint = step
        self.result.useful_seconds += self.unsaved
        self.unsaved = 0.0

    def _note_batch(self, life: _Life) -> None:
        """As Job._note_batch at a worker's hello (a life keeps one batch), bounded to HISTORY_CAP entries."""
        result = self.result
        current = (life.batch, life.accum)
        if current == self.last_batch:
            return
        if self.last_batch is not None:
            result.batch_changes += 1
            result.batch_reductions += life.batch < self.last_batch[0]
        self.last_batch = current
        if len(result.batch_history) < HISTORY_CAP:
            result.batch_history.append([life.start_checkpoint, life.batch, life.accum])

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
    "seed": (int, 0, 0, "seed of the noise"),
}


# Options that are Scenario fields under the same name and unit.
_SAME_NAMES = ("steps", "batch", "accum", "min_batch", "step_seconds", "restart_seconds", "checkpoint_every",
               "samples_per_step", "seed", "max_attempts", "regrow_after_steps", "min_steps_per_life")


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
