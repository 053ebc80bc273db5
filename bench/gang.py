"""Gangs: two-rank step rate supervised ÷ unsupervised, and gang recovery time.

Step rate: the built-in job on two ranks (ring backend on loopback), once started by hand (``MLX_RANK`` and
``MLX_HOSTFILE``, no daemon) and once under ``mlxsupd run`` with ``ranks = 2``, in interleaved pairs. Rank 0
reports the training loop's steps/s (``--stats-file``), so process start-up and the ring's connection set-up are
excluded from both. The supervised arm has a generous per-rank budget and no periodic checkpoints, like the
single-process overhead benchmark: what is measured is the cost of being supervised, including the stop flag that
rides in every gradient all-reduce.

Recovery: a leak on rank 1 only; each breach decision is followed by a checkpoint of both ranks at one step, a
gang exit and restart. The time from the decision to the first step of every rank of the next life is the
lifecycle's own measure (``recovery_seconds_*`` of the summary).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from bench.common import PYTHON, BenchError, Child, median, read_json, rounded, run_supervised
from worker.cli import train_argv

WORLD = 2


def _hostfile(work: Path, base: int) -> Path:
    path = work / "hosts.json"
    path.write_text(json.dumps([[f"127.0.0.1:{base + rank}"] for rank in range(WORLD)]))
    return path


def _unsupervised(work: Path, train: dict[str, Any], port: int, timeout: float) -> float:
    """Steps/s of rank 0 of two ranks started by hand."""
    work.mkdir(parents=True, exist_ok=True)
    stats = work / "stats.json"
    argv = [PYTHON, "-m", "worker", *train_argv({**train, "stats_file": str(stats)})]
    hostfile = _hostfile(work, port)
    logs = [open(work / f"rank{rank}.log", "ab") for rank in range(WORLD)]  # noqa: SIM115 - closed below
    children = [Child(argv, env={"MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile)}, stdout=logs[rank],
                      stderr=logs[rank]) for rank in range(WORLD)]
    try:
        codes = [child.wait(timeout) for child in children]
    finally:
        for child in children:
            child.kill()
        for log in logs:
            log.close()
    if any(codes):
        raise BenchError(f"unsupervised ranks exited {codes}; see {work}/rank*.log")
    return float(read_json(stats)["steps_per_second"])


def _supervised(work: Path, train: dict[str, Any], port: int, timeout: float) -> float:
    stats = work / "stats.json"
    job = {"ranks": WORLD, "budget": "4GiB", "checkpoint_every": 0, "gang": {"port": port},
           "train": {**train, "stats_file": str(stats)}}
    run = run_supervised(work, job, timeout)
    if run.summary.get("outcome") != "finished" or run.summary.get("restarts"):
        raise BenchError(f"supervised gang run did not finish cleanly: {run.summary.get('outcome')}, "
                         f"{run.summary.get('restarts')} restarts; see {work}")
    return float(read_json(stats)["steps_per_second"])


def step_rate(work: Path, train: dict[str, Any], pairs: int, port: int, timeout: float) -> dict[str, Any]:
    """Interleaved (unsupervised, supervised) pairs; median of the per-pair ratios."""
    rows: list[dict[str, Any]] = []
    for index in range(pairs):
        order = ("unsupervised", "supervised") if index % 2 == 0 else ("supervised", "unsupervised")
        rates = {}
        for arm in order:
            runner = _unsupervised if arm == "unsupervised" else _supervised
            rates[arm] = runner(work / f"pair{index}-{arm}", train, port + 40 * index, timeout)
        rows.append({"unsupervised_steps_per_s": round(rates["unsupervised"], 3),
                     "supervised_steps_per_s": round(rates["supervised"], 3),
                     "ratio": round(rates["supervised"] / rates["unsupervised"], 4), "order": "/".join(order),
                     "load_average": round(os.getloadavg()[0], 2)})
    ratios = [float(r["ratio"]) for r in rows]
    # On a shared 2-core machine the ranks' spin-waits make the rate swing with any other load: keep the spread.
    return {"gang_step_rate_ratio": rounded(median(ratios)), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "pairs": rows, "train": train}


def recovery(work: Path, train: dict[str, Any], port: int, timeout: float) -> dict[str, Any]:
    """A leak on rank 1 only, supervised to the end: every gang restart's decision -> all ranks stepping."""
    job = {"ranks": WORLD, "budget": "400MiB", "checkpoint_every": 0, "gang": {"port": port},
           "train": {**train, "leak_mb_per_step": 20, "fault_rank": 1}}
    run = run_supervised(work, job, timeout)
    summary = run.summary
    if summary.get("outcome") != "finished" or not summary.get("restarts"):
        raise BenchError(f"gang recovery run: {summary.get('outcome')}, {summary.get('restarts')} restarts")
    stops = summary.get("stop_steps", [])
    return {
        "gang_recovery_seconds": summary.get("recovery_seconds_median"),
        "gang_recovery_seconds_max": summary.get("recovery_seconds_max"),
        "restarts": summary.get("restarts"), "stop_steps": stops,
        "stop_steps_equal": bool(stops) and all(len(set(s)) == 1 for s in stops),
        "samples_over_budget": summary.get("samples_over_budget"),
        "ranks": summary.get("ranks"), "job_dir": str(run.job_dir),
    }


def measure(work: Path, train: dict[str, Any], pairs: int, recovery_steps: int, timeout: float) -> dict[str, Any]:
    port = 34000 + (os.getpid() % 200) * 40  # ring ports of this run (each generation moves on)
    result = step_rate(work / "rate", train, pairs, port, timeout)
    result.update(recovery(work / "recovery", {**train, "steps": recovery_steps}, port + 20, timeout))
    result["note"] = ("gang_step_rate_ratio: rank 0's steps/s under mlxsupd run (ranks = 2) ÷ two ranks started "
                      "by hand, batch 8 per rank, no checkpoints, interleaved pairs; gang_recovery_seconds: breach "
                      "decision on rank 1 -> first step of every rank of the next life (median over restarts)")
    return result
