"""Supervision overhead: steps/s of the built-in job supervised ÷ unsupervised, interleaved A/B pairs.

Both arms run the same ``python -m worker`` with the same options at a fixed batch and report their own
throughput with ``--stats-file`` (steps/s of the training loop, so process start-up and MLX import are
excluded from both). The supervised arm passes it through the job's train table. Its budget is generous (no
breach), and periodic checkpoints are off (``checkpoint_every = 0``) because the unsupervised arm does not
checkpoint either: what is measured is the cost of being supervised (per-step telemetry, command polling,
20 Hz footprint sampling by the daemon on the other core), not the cost of checkpointing.
The order inside a pair alternates (AB, BA, AB, ...) so drift (thermal, page cache) cancels out.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from bench.common import PYTHON, BenchError, median, read_json, rounded, run_child, run_child_rusage, run_supervised
from worker.cli import train_argv


def _unsupervised(work: Path, train: dict[str, Any], timeout: float) -> tuple[float, float]:
    """(steps/s of the training loop, CPU seconds of the whole process) of the job run alone."""
    stats = work / "stats.json"
    argv = [PYTHON, "-m", "worker", *train_argv({**train, "stats_file": str(stats)})]
    code, cpu = run_child_rusage(argv, timeout, log=work / "worker.log")
    if code != 0:
        raise BenchError(f"unsupervised worker exited {code}; see {work / 'worker.log'}")
    return float(read_json(stats)["steps_per_second"]), cpu


def _supervised(work: Path, train: dict[str, Any], timeout: float) -> tuple[float, float]:
    """(steps/s of the training loop, CPU seconds of mlxsupd plus its worker) of the job supervised."""
    stats = work / "stats.json"
    job = {"budget": "6GiB", "checkpoint_every": 0, "train": {**train, "stats_file": str(stats)}}
    run = run_supervised(work, job, timeout)
    if run.summary.get("outcome") != "finished" or run.summary.get("restarts"):
        raise BenchError(f"supervised overhead run did not finish cleanly: {run.summary.get('outcome')}, "
                         f"{run.summary.get('restarts')} restarts")
    return float(read_json(stats)["steps_per_second"]), run.cpu_seconds


def measure(work: Path, train: dict[str, Any], pairs: int, timeout: float) -> dict[str, Any]:
    """Run ``pairs`` interleaved (unsupervised, supervised) pairs; median of the per-pair ratios."""
    rows: list[dict[str, Any]] = []
    load_before = os.getloadavg()[0]
    for index in range(pairs):
        order = ("unsupervised", "supervised") if index % 2 == 0 else ("supervised", "unsupervised")
        rates: dict[str, tuple[float, float]] = {}
        for arm in order:
            runner = _unsupervised if arm == "unsupervised" else _supervised
            rates[arm] = runner(work / f"pair{index}-{arm}", train, timeout)
        (unsup, unsup_cpu), (sup, sup_cpu) = rates["unsupervised"], rates["supervised"]
        rows.append({"unsupervised_steps_per_s": round(unsup, 3), "supervised_steps_per_s": round(sup, 3),
                     "ratio": round(sup / unsup, 4), "unsupervised_cpu_s": round(unsup_cpu, 3),
                     "supervised_cpu_s": round(sup_cpu, 3), "cpu_ratio": round(unsup_cpu / sup_cpu, 4),
                     "order": "/".join(order), "load_average": round(os.getloadavg()[0], 2)})
    return {
        "overhead_ratio": rounded(median([r["ratio"] for r in rows])),
        "overhead_cpu_ratio": rounded(median([r["cpu_ratio"] for r in rows])),
        "pairs": rows,
        "train": train,
        "load_average_before": round(load_before, 2),
        "note": ("ratio: steps/s supervised ÷ unsupervised (wall clock of the training loop, --stats-file) at "
                 "batch 8, checkpoint_every 0, budget 6GiB (no breach); cpu_ratio: CPU seconds unsupervised "
                 "worker ÷ (mlxsupd + its worker), whole processes including start-up (wait4 rusage), which "
                 "other load on the machine barely moves"),
    }


def sdk_cost(work: Path, calls: int, timeout: float) -> dict[str, Any]:
    """Per-call cost of ``Session.end_step`` supervised vs standalone (``bench.sdk_cost`` in a child)."""
    log = work / "sdk_cost.json"
    log.unlink(missing_ok=True)
    code = run_child([PYTHON, "-m", "bench.sdk_cost", "--calls", str(calls)], timeout, log=log)
    lines = log.read_text().strip().splitlines() if log.exists() else []
    if code != 0 or not lines:
        raise BenchError(f"bench.sdk_cost exited {code}; see {log}")
    try:
        return dict(json.loads(lines[-1]))
    except ValueError as exc:
        raise BenchError(f"bench.sdk_cost printed no JSON: {exc}") from None
