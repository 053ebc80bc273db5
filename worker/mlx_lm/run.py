"""One worker life of an mlx-lm fine-tune: load, resume, train to the target, save, report through the Session.

Steps are optimizer steps. mlx-lm counts micro-batch iterations (``iters``, ``steps_per_eval``, ``save_every``,
``steps_per_report``); iteration ``it`` of the configured shape ends in optimizer step ``ceil(it / accum)``, so
an action due at iteration ``it`` happens at the end of that step and keeps mlx-lm's name (adapter files are
``{it:07d}_adapters.safetensors``). The target is ``iters // grad_accumulation_steps`` steps (mlx-lm never
applies a trailing partial accumulation either) and does not change when the daemon changes batch × accum.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import types
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.utils import maybe_set_recommended_wired_limit

from worker.inject import Leak, transient_peak, use_peak
from worker.mlx_lm import setup
from worker.mlx_lm.batches import StepBatches
from worker.mlx_lm.trainer import Trainer
from worker.session import Session

# Fault injection for testing the supervisor (the built-in job's --leak-mb-per-step and friends).
INJECT_LEAK = "MLXSUP_INJECT_LEAK_MB_PER_STEP"
INJECT_PEAK = "MLXSUP_INJECT_PEAK_MB_PER_SAMPLE"
INJECT_PEAK_UNTIL = "MLXSUP_INJECT_PEAK_UNTIL_STEP"
STATS_FILE = "MLXSUP_STATS_FILE"  # the benchmark's: iterations/s of this life's training loop, as JSON
WARMUP_ITERATIONS = 10  # left out of the benchmark's iterations/s: the first steps compile


class Schedule:
    """When mlx-lm's iteration-counted actions fall, in optimizer steps of the configured accumulation."""

    def __init__(self, args: types.SimpleNamespace) -> None:
        self.accum = args.grad_accumulation_steps
        self.target = args.iters // self.accum

    def due(self, step: int, every: int) -> int | None:
        """The last iteration that is a multiple of ``every`` within optimizer step ``step`` (1-based)."""
        last = step * self.accum
        due = last - last % every
        return due if due > (step - 1) * self.accum else None


class SetupError(Exception):
    """The model, tokenizer or data could not be loaded as given; the message says what mlx-lm reported."""


def run(args: types.SimpleNamespace) -> int:
    """Train under the daemon (or standalone) until the target step; 0 when done, 2 when setup failed."""
    schedule = Schedule(args)
    session = Session.from_env(target_steps=schedule.target, batch=args.batch_size, accum=schedule.accum)
    try:
        _train(session, args, schedule)
    except SetupError as exc:
        print(f"python -m worker.mlx_lm: error: {exc}", file=sys.stderr)
        return 2
    finally:
        session.close()
    return 0


def _load(session: Session, args: types.SimpleNamespace) -> tuple[Any, Any, tuple[Any, Any, Any]]:
    """Model (made trainable as asked), optimizer, and the train, validation and test sets."""
    try:
        with session.busy("model_load"):
            model, tokenizer = setup.load_model(args)
            datasets = setup.load_data(args, tokenizer)
            setup.prepare(model, args)
            return model, setup.build_optimizer(args), datasets
    except (ValueError, KeyError, OSError) as exc:  # what mlx-lm raises for a bad model, adapter or data set
        raise SetupError(f"{type(exc).__name__}: {exc}") from exc


def _train(session: Session, args: types.SimpleNamespace, schedule: Schedule) -> None:
    model, optimizer, (train_set, valid_set, test_set) = _load(session, args)
    resumed = session.resume(model, optimizer, trainable_only=True)
    step = resumed.step
    if step == 0 and args.resume_adapter_file:
        model.load_weights(args.resume_adapter_file, strict=False)
    effective = session.batch * session.accum
    _check_resume(resumed.extra, args, effective)
    setup.write_adapter_config(args)
    maybe_set_recommended_wired_limit()  # what mlx_lm's train() does (Metal only; see docs/mlx-lm.md)
    threshold = session.settings.cache_clear_bytes or args.clear_cache_threshold
    trainer = Trainer(model, optimizer, args, StepBatches(train_set, effective, args.max_seq_length, args.seed),
                      threshold)
    validation = _validation_batches(valid_set, args)
    _header(model, args, schedule, session, step)
    report = _Report()
    if step == 0 and validation is not None:
        with session.busy("validation"):
            _log(f"Iter 0: Val loss {trainer.evaluate(validation, args.val_batches, session.batch):.3f}")
    step = _loop(session, trainer, validation, args, schedule, step, report)
    with session.busy("saving"):
        trainer.save(None)
    report.write_stats()
    if args.test and len(test_set) >= args.batch_size:
        with session.busy("test"):
            tests = StepBatches(test_set, args.batch_size, args.max_seq_length, args.seed)
            _log(f"Test loss {trainer.evaluate(tests, args.test_batches, session.batch):.3f}")
    session.finish(step, _extra(args, step, effective, schedule))


def _loop(session: Session, trainer: Trainer, validation: StepBatches | None, args: types.SimpleNamespace,
          schedule: Schedule, step: int, report: _Report) -> int:
    leak = Leak(float(os.environ.get(INJECT_LEAK) or 0))
    peak_mb, peak_until = float(os.environ.get(INJECT_PEAK) or 0), int(os.environ.get(INJECT_PEAK_UNTIL) or 0)
    effective = session.batch * session.accum
    first = True
    while step < schedule.target:
        began = time.perf_counter()
        peak = transient_peak(peak_mb if peak_until <= 0 or step < peak_until else 0.0, session.batch)
        with session.busy("compile") if first else contextlib.nullcontext():
            result = trainer.step(step, session.batch)
        use_peak(peak)
        del peak
        step += 1
        first = False
        leak.step(step, None)
        report.add(result.loss, result.tokens, result.seconds, schedule.accum)
        val_loss, aside = _between_steps(session, trainer, validation, args, schedule, step, report)
        session.end_step(step, result.loss, _extra(args, step, effective, schedule),
                         tokens_per_second=result.tokens / result.seconds, val_loss=val_loss)
        report.timed(time.perf_counter() - began - aside, schedule.accum)
    return step


def _between_steps(session: Session, trainer: Trainer, validation: StepBatches | None, args: types.SimpleNamespace,
                   schedule: Schedule, step: int, report: _Report) -> tuple[float | None, float]:
    """Validation, the report line and adapter saves due after ``step``: (validation loss, seconds they took)."""
    started = time.perf_counter()
    val_loss = None
    if validation is not None and (schedule.due(step, args.steps_per_eval) or step == schedule.target):
        with session.busy("validation"):
            val_loss = trainer.evaluate(validation, args.val_batches, session.batch)
        _log(f"Iter {step * schedule.accum}: Val loss {val_loss:.3f}, Val took {time.perf_counter() - started:.3f}s")
    if schedule.due(step, args.steps_per_report) or step == schedule.target:
        report.flush(step * schedule.accum, trainer.optimizer)
    saved = schedule.due(step, args.save_every)
    if saved is not None:
        with session.busy("saving"):
            trainer.save(saved)
    return val_loss, time.perf_counter() - started


class _Report:
    """mlx-lm's periodic training-loss line, and this life's throughput for the benchmark.

    The benchmark's figures: iterations per second of the whole loop (batching, the compiled step, the
    Session's telemetry and commands) without validation, report lines and adapter saves, which mlx-lm's own
    iterations/s leaves out too; and the CPU seconds of the training phase (first validation to final save, as
    mlx-lm's ``train()`` spans them), which load on the machine barely moves.
    """

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.tokens = self.trained_tokens = 0
        self.seconds = 0.0
        self.iterations = 0
        self.seen_iterations = self.timed_iterations = 0
        self.loop_seconds = 0.0
        self.cpu_started = time.process_time()

    def add(self, loss: float, tokens: int, seconds: float, iterations: int) -> None:
        self.losses.append(loss)
        self.tokens += tokens
        self.seconds += seconds
        self.iterations += iterations

    def flush(self, iteration: int, optimizer: Any) -> None:
        if not self.losses:
            return
        self.trained_tokens += self.tokens
        rate = optimizer.learning_rate.item()
        _log(f"Iter {iteration}: Train loss {sum(self.losses) / len(self.losses):.3f}, Learning Rate {rate:.3e}, "
             f"It/sec {self.iterations / self.seconds:.3f}, Tokens/sec {self.tokens / self.seconds:.3f}, "
             f"Trained Tokens {self.trained_tokens}, Peak mem {mx.get_peak_memory() / 1e9:.3f} GB")
        self.losses, self.tokens, self.seconds, self.iterations = [], 0, 0.0, 0

    def timed(self, seconds: float, iterations: int) -> None:
        """Count a step's loop time, after the first WARMUP_ITERATIONS (compilation) as the benchmark's plain
        arm skips mlx-lm's first report window."""
        self.seen_iterations += iterations
        if self.seen_iterations > WARMUP_ITERATIONS:
            self.loop_seconds += seconds
            self.timed_iterations += iterations

    def write_stats(self) -> None:
        path = os.environ.get(STATS_FILE)
        if path and self.loop_seconds > 0:
            Path(path).write_text(json.dumps({
                "iterations": self.timed_iterations, "seconds": self.loop_seconds,
                "iterations_per_second": self.timed_iterations / self.loop_seconds,
                "cpu_seconds": time.process_time() - self.cpu_started}))


def _validation_batches(valid_set: Any, args: types.SimpleNamespace) -> StepBatches | None:
    if len(valid_set) < args.batch_size or args.val_batches == 0:
        if args.val_batches != 0:
            _log(f"Warning: {len(valid_set)} validation examples, fewer than batch_size {args.batch_size}: "
                 "training proceeds without validation")
        return None
    return StepBatches(valid_set, args.batch_size, args.max_seq_length, args.seed)


def _extra(args: types.SimpleNamespace, step: int, effective: int, schedule: Schedule) -> dict[str, Any]:
    return {"data_position": step, "iteration": step * schedule.accum, "seed": args.seed,
            "effective_batch": effective}


def _check_resume(extra: dict[str, Any], args: types.SimpleNamespace, effective: int) -> None:
    """A checkpoint of another seed or effective batch resumes, but not exactly: say so."""
    for key, now in (("seed", args.seed), ("effective_batch", effective)):
        if key in extra and extra[key] != now:
            _log(f"Warning: the checkpoint was made with {key} {extra[key]}, this run has {now}: the data "
                 "order differs from an uninterrupted run")


def _header(model: Any, args: types.SimpleNamespace, schedule: Schedule, session: Session, step: int) -> None:
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    where = f"resuming at step {step}" if step else "from the start"
    _log(f"{args.fine_tune_type} fine-tune of {args.model}: {trainable / 1e6:.3f}M of {total / 1e6:.3f}M parameters "
         f"trainable; {schedule.target} optimizer steps of {session.batch}x{session.accum}, {where}")


def _log(line: str) -> None:
    print(line, flush=True, file=sys.stdout)
