"""Goodput on the leak scenario: unsupervised with a hard stop, stop-at-limit, shrink-only and adaptive.

The scenario is `make demo`'s (leak 50 MiB/step, budget 2 GiB, 1000 steps) with the model scaled down to
the test suite's (dim 32, layers 1, heads 2, context 32) so that four arms fit the time budget on 2 cores.

- unsupervised: the built-in job standalone (``bench.standalone``, i.e. ``python -m worker`` plus a
  per-step progress line) and a 20 Hz psutil watcher that SIGKILLs its group once RSS reaches the budget;
- stop / shrink-only / adaptive: ``mlxsupd run`` with ``policy`` set accordingly.

Definitions (see ``bench.analysis.goodput``): useful time = Σ step_seconds of the distinct steps 1..target
that were reached (a step run again after a restart counts once); busy = useful ÷ wall; completion = steps
reached ÷ target; goodput = busy × completion. Wall time runs from launching the process (worker or
``mlxsupd run``) to its end.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import psutil

from bench.analysis import goodput, restart_cycles, summarize_cycles, useful_step_seconds
from bench.common import PYTHON, SMALL, BenchError, Child, MiB, run_supervised
from bench.standalone import read_progress
from worker.cli import train_argv

BUDGET = 2 << 30
POLICIES = {"stop_at_limit": "stop", "shrink_only": "shrink-only", "supervised": "adaptive"}


def scenario(steps: int) -> dict[str, Any]:
    """The train table of the scaled leak scenario."""
    return {**SMALL, "steps": steps, "leak_mb_per_step": 50}


def _watch(child: Child, budget: int, timeout: float, interval: float = 0.05) -> tuple[int, bool]:
    """Sample the child's RSS at 20 Hz; SIGKILL its group at ``budget``. Returns (max RSS, killed)."""
    proc = psutil.Process(child.pid)
    deadline = time.monotonic() + timeout
    peak = 0
    while child.popen.poll() is None:
        if time.monotonic() > deadline:
            child.kill()
            raise BenchError(f"unsupervised leak run still going after {timeout:.0f}s")
        try:
            rss = int(proc.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        peak = max(peak, rss)
        if rss >= budget:
            os.killpg(child.pid, signal.SIGKILL)
            child.popen.wait(timeout=10)
            return peak, True
        time.sleep(interval)
    return peak, False


def unsupervised(work: Path, steps: int, timeout: float) -> dict[str, Any]:
    """The job alone, killed by an outside watcher when its RSS reaches the budget (no checkpoints)."""
    work.mkdir(parents=True, exist_ok=True)
    progress = work / "progress.txt"
    progress.unlink(missing_ok=True)
    argv = [PYTHON, "-m", "bench.standalone", "--progress", str(progress), *train_argv(scenario(steps))]
    started = time.monotonic()
    with open(work / "worker.log", "ab") as log, Child(argv, stdout=log, stderr=log) as child:
        peak, killed = _watch(child, BUDGET, timeout)
    wall = time.monotonic() - started
    rows = read_progress(progress)
    useful = sum(seconds for _, seconds, _ in rows)
    reached = max((step for step, _, _ in rows), default=0)
    return {**goodput(useful, wall, reached, steps), "killed_at_budget": killed, "max_rss_bytes": peak,
            "overshoot_bytes": max(0, peak - BUDGET)}


def supervised(work: Path, steps: int, policy: str, timeout: float) -> dict[str, Any]:
    """One ``mlxsupd run`` of the scenario under ``policy``, with goodput and restart phases."""
    job = {"budget": "2GiB", "batch": 8, "checkpoint_every": 100, "policy": policy, "train": scenario(steps)}
    run = run_supervised(work, job, timeout)
    summary = run.summary
    useful, _ = useful_step_seconds(run.telemetry, steps)
    reached = int(summary.get("steps_completed") or 0)
    wall = float(summary["wall_seconds"])
    restarts = int(summary.get("restarts") or 0)
    return {
        **goodput(useful, wall, reached, steps),
        "lost_seconds_per_restart": round((wall - useful) / restarts, 3) if restarts else None,
        "outcome": summary.get("outcome"), "restarts": restarts,
        "restart_reasons": summary.get("restart_reasons"), "batch_history": summary.get("batch_history"),
        "samples_over_budget": summary.get("samples_over_budget"),
        "samples_over_kill": summary.get("samples_over_kill"), "max_sampled_bytes": summary.get("max_sampled_bytes"),
        "summary_recovery_seconds_median": summary.get("recovery_seconds_median"),
        "recovery": summarize_cycles(restart_cycles(run.history, run.telemetry)),
        "job_dir": str(run.job_dir),
    }


def measure(work: Path, steps: int, timeout: float) -> dict[str, Any]:
    """All four arms, one after the other in this invocation."""
    arms: dict[str, Any] = {"unsupervised": unsupervised(work / "unsupervised", steps, timeout)}
    for name, policy in POLICIES.items():
        arms[name] = supervised(work / name, steps, policy, timeout)
    return {
        "goodput": {name: arm["goodput"] for name, arm in arms.items()},
        "arms": arms,
        "samples_over_kill": arms["supervised"]["samples_over_kill"],
        "note": (f"leak 50 MiB/step, budget 2 GiB, {steps} steps; model scaled down to dim 32, layers 1, "
                 "heads 2, context 32 to fit the time budget. goodput = (useful step time / wall) x "
                 "(steps reached / target); unsupervised = SIGKILL by a 20 Hz RSS watcher at the budget"),
        "budget_bytes": BUDGET,
        "leak_bytes_per_step": 50 * MiB,
    }
