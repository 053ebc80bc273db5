"""The mlx-lm job kind: supervised ÷ plain ``mlx_lm.lora`` iterations/s, and what a restart costs.

Throughput: the same LoRA fine-tune of the tiny model (``python -m worker.mlx_lm.tiny``; batch 4, every layer,
no periodic checkpoints or adapter saves in either arm) run by mlx-lm's own trainer as ``mlx_lm.lora`` runs it
(``bench.mlx_lm_plain``, timed by mlx-lm's own report callback) and by ``mlxsupd run`` with a
``[jobs.NAME.mlx_lm]`` job (timed by the worker: the whole loop with the Session's per-step telemetry and
command polling, without validation and saves, which mlx-lm's figure leaves out too). Interleaved pairs,
median of the per-pair ratios. Process start-up, imports and model loading are outside both figures.

Restart cost: a supervised run with an injected leak that recycles the worker; per restart, the checkpoint
(trainable parameters + optimizer state: size and seconds) and the phases from the decision to the next
productive step (``bench.analysis.restart_cycles``): most of it is importing mlx-lm and loading the model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from bench.analysis import restart_cycles, summarize_cycles
from bench.common import PYTHON, BenchError, median, read_json, rounded, run_child, run_child_rusage, run_supervised

OPTIONS: dict[str, Any] = {"iters": 100, "batch_size": 4, "num_layers": 4, "learning_rate": 1e-4, "val_batches": 2,
                           "steps_per_eval": 100_000, "save_every": 100_000, "steps_per_report": 10}


def build_model(work: Path, timeout: float) -> tuple[Path, Path]:
    """The tiny model and data, built offline in a child (the bench process does not import MLX)."""
    code = run_child([PYTHON, "-m", "worker.mlx_lm.tiny", str(work)], timeout, log=work / "tiny.log",
                     env={"HF_HUB_OFFLINE": "1"})
    if code != 0:
        raise BenchError(f"building the tiny model exited {code}; see {work / 'tiny.log'}")
    return work / "model", work / "data"


def _plain(work: Path, options: dict[str, Any], timeout: float) -> tuple[dict[str, Any], float]:
    """(mlx-lm's own figures: iterations/s and training-phase CPU seconds; CPU seconds of the whole process)."""
    stats = work / "stats.json"
    sets = [f"{k}={json.dumps(v)}" for k, v in {**options, "adapter_path": str(work / "adapters")}.items()]
    argv = [PYTHON, "-m", "bench.mlx_lm_plain", "--out", str(stats), *(a for s in sets for a in ("--set", s))]
    code, cpu = run_child_rusage(argv, timeout, log=work / "plain.log",
                                 env={"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "true"})  # as mlx_lm.lora
    if code != 0:
        raise BenchError(f"plain mlx-lm run exited {code}; see {work / 'plain.log'}")
    return read_json(stats), cpu


def _supervised(work: Path, options: dict[str, Any], timeout: float) -> tuple[dict[str, Any], float]:
    """(the worker's figures: iterations/s and training-phase CPU seconds; CPU seconds of mlxsupd and worker)."""
    stats = work / "stats.json"
    job = {"budget": "6GiB", "checkpoint_every": 0, "env": {"HF_HUB_OFFLINE": "1", "MLXSUP_STATS_FILE": str(stats)},
           "mlx_lm": {**options, "adapter_path": str(work / "adapters")}}
    run = run_supervised(work, job, timeout)
    if run.summary.get("outcome") != "finished" or run.summary.get("restarts"):
        raise BenchError(f"supervised mlx-lm run did not finish cleanly: {run.summary.get('outcome')}, "
                         f"{run.summary.get('restarts')} restarts")
    return read_json(stats), run.cpu_seconds


def throughput(work: Path, options: dict[str, Any], pairs: int, timeout: float) -> dict[str, Any]:
    """Interleaved (plain, supervised) pairs; the order alternates so drift cancels out."""
    rows = []
    for index in range(pairs):
        order = ("plain", "supervised") if index % 2 == 0 else ("supervised", "plain")
        rates = {arm: (_plain if arm == "plain" else _supervised)(work / f"pair{index}-{arm}", options, timeout)
                 for arm in order}
        (plain, plain_process), (supervised, supervised_process) = rates["plain"], rates["supervised"]
        rows.append({
            "plain_iterations_per_s": round(plain["iterations_per_second"], 3),
            "supervised_iterations_per_s": round(supervised["iterations_per_second"], 3),
            "ratio": round(supervised["iterations_per_second"] / plain["iterations_per_second"], 4),
            "plain_training_cpu_s": round(plain["cpu_seconds"], 3),
            "supervised_training_cpu_s": round(supervised["cpu_seconds"], 3),
            "cpu_ratio": round(plain["cpu_seconds"] / supervised["cpu_seconds"], 4),
            "process_cpu_ratio": round(plain_process / supervised_process, 4),
            "order": "/".join(order), "load_average": round(os.getloadavg()[0], 2)})
    return {"mlx_lm_ratio": rounded(median([r["ratio"] for r in rows])),
            "mlx_lm_cpu_ratio": rounded(median([r["cpu_ratio"] for r in rows])),
            "mlx_lm_process_cpu_ratio": rounded(median([r["process_cpu_ratio"] for r in rows])), "pairs": rows}


def restart_cost(work: Path, options: dict[str, Any], iters: int, timeout: float) -> dict[str, Any]:
    """A leak run that recycles the worker (about every 13 steps); the checkpoint and recovery phases per
    restart."""
    job = {"budget": "700MiB", "checkpoint_every": 0,
           "env": {"HF_HUB_OFFLINE": "1", "MLXSUP_INJECT_LEAK_MB_PER_STEP": "40"},
           "mlx_lm": {**options, "iters": iters, "adapter_path": str(work / "adapters")}}
    run = run_supervised(work, job, timeout)
    if run.summary.get("outcome") != "finished" or not run.summary.get("restarts"):
        raise BenchError(f"mlx-lm leak run: {run.summary.get('outcome')}, {run.summary.get('restarts')} restarts")
    saves = [e for e in run.history if e.get("event") == "checkpoint"]
    cycles = restart_cycles(run.history, run.telemetry)
    return {"restarts": run.summary["restarts"], "checkpoint_bytes": saves[-1]["bytes"] if saves else None,
            "checkpoint_seconds_median": median([float(e["seconds"]) for e in saves]),
            "recovery": summarize_cycles(cycles), "cycles": cycles, "job_dir": str(run.job_dir)}


def measure(work: Path, iters: int, pairs: int, restart_iters: int, timeout: float) -> dict[str, Any]:
    """Throughput pairs of ``iters`` iterations (the first 10, compiling, are left out of both arms), then a leak
    run of ``restart_iters``."""
    model, data = build_model(work / "tiny", timeout)
    options = {**OPTIONS, "model": str(model), "data": str(data), "iters": iters}
    result = throughput(work / "throughput", options, pairs, timeout)
    result["restart"] = restart_cost(work / "restart", options, restart_iters, timeout)
    result["options"] = options
    result["note"] = ("ratio: iterations/s supervised (mlxsupd run, [jobs.NAME.mlx_lm]) ÷ plain (mlx-lm's train() "
                      "as mlx_lm.lora runs it), training loop only, wall clock; cpu_ratio: CPU seconds of the "
                      "training phase (first validation to final save), plain ÷ supervised worker, which other load "
                      "on the machine barely moves; process_cpu_ratio: whole processes, plain ÷ (mlxsupd + worker), "
                      "imports and model load included (wait4 rusage); restart: leak 40 MiB/step under 700 MiB")
    return result
