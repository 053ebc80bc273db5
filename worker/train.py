"""The built-in job's training loop, written against the public Session SDK like any user loop."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from worker.inject import Leak, transient_peak, use_peak
from worker.lm import ByteLM, ModelConfig, accumulated_grads, load_corpus, loss_fn, step_batch
from worker.session import Session
from worker.standby import wait_for_go

FaultDue = Callable[[int, int], bool]


def build(args: argparse.Namespace) -> tuple[ByteLM, optim.Optimizer]:
    """Model and optimizer, initialised deterministically from the seed."""
    mx.random.seed(args.seed)
    model = ByteLM(ModelConfig(dim=args.dim, layers=args.layers, heads=args.heads, context=args.context))
    mx.eval(model.parameters())
    return model, optim.AdamW(learning_rate=args.lr)


def train(session: Session, args: argparse.Namespace, fault_due: FaultDue) -> None:
    """Train to ``args.steps`` optimizer steps, resuming from the session's latest checkpoint."""
    corpus = load_corpus(args.data)  # data, not state: a standby may hold it (4 MiB at most)
    wait_for_go(session)  # a standby waits here, before the weights exist and before the seed is set
    model, optimizer = build(args)
    step = resumed_step = session.resume(model, optimizer).step
    grad_fn = nn.value_and_grad(model, loss_fn)
    faulty = faults_here(args, session)
    leak = Leak(args.leak_mb_per_step if faulty else 0.0)
    if not faulty:
        fault_due = _never
        args = argparse.Namespace(**{**vars(args), "peak_mb_per_sample": 0.0})
    started = time.perf_counter()
    step = _loop(session, args, fault_due, model, optimizer, corpus, grad_fn, leak, step)
    if args.stats_file and (session.gang is None or session.gang.rank == 0):
        _write_stats(args.stats_file, step - resumed_step, time.perf_counter() - started)
    session.finish(step, extra={"data_position": step, "seed": args.seed})


def _never(after: int, done_in_life: int) -> bool:
    return False


def faults_here(args: argparse.Namespace, session: Session) -> bool:
    """Whether this process injects the test faults (``--fault-rank``: only that rank of a gang)."""
    rank = session.gang.rank if session.gang is not None else 0
    return bool(args.fault_rank < 0 or args.fault_rank == rank)


def rank_slice(session: Session) -> tuple[int, int]:
    """(rank, ranks): this process's share of every step's samples (0, 1 outside a gang)."""
    if session.gang is None:
        return 0, 1
    return session.gang.rank, session.gang.group.size()


def _write_stats(path: str, steps: int, seconds: float) -> None:
    """Throughput of the life that finished the run (used by the benchmarks)."""
    stats = {"steps": steps, "seconds": seconds, "steps_per_second": steps / seconds if seconds > 0 else 0.0}
    Path(path).write_text(json.dumps(stats))


def _loop(session: Session, args: argparse.Namespace, fault_due: FaultDue, model: ByteLM,
          optimizer: optim.Optimizer, corpus: mx.array, grad_fn: Any, leak: Leak, step: int) -> int:
    done_in_life = 0
    rank, ranks = rank_slice(session)
    while step < args.steps:
        if fault_due(args.crash_after_steps, done_in_life):
            raise SystemExit(3)
        if fault_due(args.hang_after_steps, done_in_life):
            time.sleep(3600)  # a hung worker; the daemon must notice and kill it
        # The step's samples are a function of (seed, step) alone; each rank takes its share, so the global
        # batch (ranks x batch x accum) sees the same samples however the daemon splits it.
        share = session.batch * session.accum
        tokens = step_batch(corpus, args.seed, step, ranks * share, args.context)[rank * share:(rank + 1) * share]
        peak_on = args.peak_until_step <= 0 or step < args.peak_until_step
        peak = transient_peak(args.peak_mb_per_sample if peak_on else 0.0, session.batch)
        loss, grads = accumulated_grads(grad_fn, model, tokens, session.batch)
        grads = session.average_gradients(grads)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state, loss)
        use_peak(peak)
        del peak
        leak.step(step, grads)
        if args.step_sleep:
            time.sleep(args.step_sleep)
        step += 1
        done_in_life += 1
        session.end_step(step, cast(float, loss.item()), extra={"data_position": step, "seed": args.seed})
    return step
