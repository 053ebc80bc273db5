"""Quick measure of the standby (not part of ``make bench``): the leaking built-in job supervised with
``standby = "off"`` and ``"auto"``, runs alternated in one invocation, side by side.

Per run it reads the summary: the median seconds from a recycle decision to the next life's first step
(``recovery_seconds_median``, every recovery of the run), the restarts, how many lives began as a standby's go,
and the largest standby footprint sampled. ``python -m bench.standby_quick [--rounds N] [--steps N] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from bench.common import SMALL, MiB, run_supervised

JOB: dict[str, Any] = {"budget": "600MiB", "checkpoint_every": 0, "startup_timeout": 60.0}


def one(work: Path, standby: str, steps: int, leak_mb: float) -> dict[str, Any]:
    job = {**JOB, "standby": standby, "train": {**SMALL, "steps": steps, "leak_mb_per_step": leak_mb}}
    run = run_supervised(work, job, timeout=900)
    s = run.summary
    if run.code != 0 or s["outcome"] != "finished":
        raise SystemExit(f"{standby}: run ended {s['outcome']} (exit {run.code}); see {work}")
    return {"standby": standby, "recovery_median": s["recovery_seconds_median"], "recoveries": s["recoveries"],
            "restarts": s["restarts"], "used": s["standby"]["used"], "standby_max_mib": s["standby"]["max_bytes"] / MiB,
            "samples_over_budget": s["samples_over_budget"], "samples_over_kill": s["samples_over_kill"],
            "wall": round(run.wall, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.standby_quick", description=__doc__)
    parser.add_argument("--rounds", type=int, default=2, help="runs per arm, alternated (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=200, help="steps per run (default: %(default)s)")
    parser.add_argument("--leak-mb", type=float, default=20.0, help="leak per step, MiB (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="mlxsup-sb-") as tmp:
        for index in range(args.rounds):
            for arm in ("off", "auto"):
                rows.append(one(Path(tmp) / f"{arm}-{index}", arm, args.steps, args.leak_mb))
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'arm':6} {'recovery median s':>18} {'recoveries':>10} {'standby go':>10} {'standby MiB':>11} "
          f"{'over budget':>11} {'over kill':>9} {'wall s':>7}")
    for row in rows:
        print(f"{row['standby']:6} {row['recovery_median']:>18.4f} {row['recoveries']:>10} {row['used']:>10} "
              f"{row['standby_max_mib']:>11.1f} {row['samples_over_budget']:>11} {row['samples_over_kill']:>9} "
              f"{row['wall']:>7}")
    for arm in ("off", "auto"):
        medians = [r["recovery_median"] for r in rows if r["standby"] == arm and r["recovery_median"] is not None]
        print(f"{arm}: median of run medians {statistics.median(medians):.4f} s over {len(medians)} runs"
              if medians else f"{arm}: no recoveries")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
