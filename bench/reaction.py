"""Reaction to a sudden jump over budget, and how long recovery takes.

The scenario is the suite's peak test: the small model at batch 8 holding a transient working set of
``peak_mb_per_sample`` × batch (120 MiB × 8) for each step, under a 900 MiB budget with the kill ceiling at
150%. Memory jumps past the budget within one step, so what is measured is the daemon's reaction: from the
first footprint sample at/over budget to the checkpoint-and-exit decision (two consecutive samples are
required, 50 ms apart) and to the worker's exit (it acts at its next step boundary, after the checkpoint).
The restart shrinks the batch to 4×2 and the run finishes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.analysis import reaction, restart_cycles
from bench.common import SMALL, run_supervised


def measure(work: Path, steps: int, timeout: float) -> dict[str, Any]:
    """One supervised peak run; reaction numbers plus its restart phases."""
    job = {"budget": "900MiB", "kill": "150%", "batch": 8, "checkpoint_every": 5,
           "train": {**SMALL, "steps": steps, "peak_mb_per_sample": 120}}
    run = run_supervised(work, job, timeout)
    summary = run.summary
    result = reaction(run.history, run.telemetry, int(summary["budget_bytes"]), int(summary["kill_bytes"]))
    return {
        **result,
        "outcome": summary.get("outcome"), "restarts": summary.get("restarts"),
        "batch_history": summary.get("batch_history"), "budget_bytes": summary.get("budget_bytes"),
        "kill_bytes": summary.get("kill_bytes"), "max_sampled_bytes": summary.get("max_sampled_bytes"),
        "summary_samples_over_kill": summary.get("samples_over_kill"),
        "cycles": restart_cycles(run.history, run.telemetry),
        "job_dir": str(run.job_dir),
        "note": "peak 120 MiB/sample x batch 8 under budget 900 MiB, kill 150%; small model",
    }
