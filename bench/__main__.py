"""``python -m bench [--quick]``: run the benchmark suite, print the table, write ``.bench/results.json``.

Exit status 0 when every section ran (targets may still be missed: see the table), 1 when one failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import (
    analysis,
    ckpt_io,
    control,
    daemon_cost,
    dashboard,
    forensics,
    gang,
    goodput,
    lockstep,
    mlx_lm,
    overhead,
    reaction,
    report,
    standby,
)
from bench.common import ROOT, SMALL, BenchError, atomic_write_json


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes of one run of the suite."""

    overhead_steps: int
    overhead_pairs: int
    lockstep_seconds: float  # per arm
    sdk_calls: int
    reaction_steps: int
    goodput_steps: int
    ckpt_mb: int
    ckpt_rounds: int
    idle_seconds: float
    control_requests: int
    flood_messages: int
    flood_linger: float
    daemon_window: float  # seconds of steady streaming each daemon CPU figure is measured over
    mlx_lm_iters: int
    mlx_lm_pairs: int
    mlx_lm_restart_iters: int
    gang_steps: int
    gang_pairs: int
    gang_recovery_steps: int
    census_repeats: int = 50
    attribution_messages: int = 5000
    attribution_blocks: int = 21
    dashboard_seconds: float = 15.0  # per arm and round: one tail -f, then a dashboard with a page open
    dashboard_rounds: int = 2
    standby_steps: int = 1000  # the built-in leak scenario (the goodput section's), per arm and pair
    standby_mlx_lm_iters: int = 250
    standby_mlx_lm_leak_mb: float = 5.0
    standby_idle_steps: int = 400
    standby_pairs: int = 2


FULL = Plan(overhead_steps=600, overhead_pairs=3, lockstep_seconds=300.0, sdk_calls=5000, reaction_steps=40,
            goodput_steps=1000, ckpt_mb=100, ckpt_rounds=5, idle_seconds=10.0, control_requests=500,
            flood_messages=50_000, flood_linger=3.0, mlx_lm_iters=100, mlx_lm_pairs=9, mlx_lm_restart_iters=40,
            gang_steps=300, gang_pairs=5, gang_recovery_steps=120, daemon_window=15.0)
QUICK = Plan(overhead_steps=60, overhead_pairs=1, lockstep_seconds=3.0, sdk_calls=1000, reaction_steps=12,
             goodput_steps=100, ckpt_mb=10, ckpt_rounds=1, idle_seconds=2.0, control_requests=50,
             flood_messages=2000, flood_linger=1.0, mlx_lm_iters=20, mlx_lm_pairs=1, mlx_lm_restart_iters=20,
             gang_steps=40, gang_pairs=1, gang_recovery_steps=40, daemon_window=2.0, census_repeats=5,
             attribution_messages=500, attribution_blocks=3, dashboard_seconds=2.0, dashboard_rounds=1,
             standby_steps=100, standby_mlx_lm_iters=20, standby_mlx_lm_leak_mb=40.0, standby_idle_steps=40,
             standby_pairs=1)
RUN_TIMEOUT = 600.0  # seconds any one child may take before its group is killed
SECTION_ERRORS = (BenchError, OSError, subprocess.SubprocessError, KeyError, ValueError, TypeError)


LOCKSTEP_SLICE = 0.25  # seconds each arm runs per turn


def _overhead(work: Path, plan: Plan) -> dict[str, Any]:
    """The lockstep ratio is the headline (``bench.lockstep``); whole-run pairs, as measured before it, follow."""
    sliced = lockstep.measure(work / "lockstep", dict(SMALL), plan.lockstep_seconds, LOCKSTEP_SLICE, RUN_TIMEOUT)
    whole = overhead.measure(work, {**SMALL, "steps": plan.overhead_steps}, plan.overhead_pairs, RUN_TIMEOUT)
    return {
        "overhead_ratio": sliced["ratio"], "overhead_ratio_ci95": sliced["ci95"],
        "overhead_cpu_ratio": sliced["cpu"]["ratio"], "lockstep": sliced, "whole_runs": whole,
        "sdk": overhead.sdk_cost(work, plan.sdk_calls, 120),
    }


def _reaction(work: Path, plan: Plan) -> dict[str, Any]:
    return reaction.measure(work, plan.reaction_steps, RUN_TIMEOUT)


def _goodput(work: Path, plan: Plan) -> dict[str, Any]:
    return goodput.measure(work, plan.goodput_steps, RUN_TIMEOUT)


def _checkpoint(work: Path, plan: Plan) -> dict[str, Any]:
    return ckpt_io.measure(work, plan.ckpt_mb, plan.ckpt_rounds)


def _control(work: Path, plan: Plan) -> dict[str, Any]:
    result = control.daemon_idle(work / "idle", plan.idle_seconds, plan.control_requests)
    result.update(control.telemetry_ingest(work / "flood", plan.flood_messages, plan.flood_linger, 120))
    return result


def _mlx_lm(work: Path, plan: Plan) -> dict[str, Any]:
    return mlx_lm.measure(work, plan.mlx_lm_iters, plan.mlx_lm_pairs, plan.mlx_lm_restart_iters, RUN_TIMEOUT)


def _daemon(work: Path, plan: Plan) -> dict[str, Any]:
    return {"sweep": daemon_cost.sweep(work / "sweep", plan.daemon_window),
            "sixteen_jobs": daemon_cost.sixteen_jobs(work / "sixteen", plan.daemon_window, plan.control_requests)}


def _forensics(work: Path, plan: Plan) -> dict[str, Any]:
    return forensics.measure(work, plan.census_repeats, plan.attribution_messages, plan.attribution_blocks,
                             RUN_TIMEOUT)


def _dashboard(work: Path, plan: Plan) -> dict[str, Any]:
    return dashboard.run(plan.dashboard_seconds, plan.dashboard_rounds)


def _gang(work: Path, plan: Plan) -> dict[str, Any]:
    return gang.measure(work, {**SMALL, "steps": plan.gang_steps}, plan.gang_pairs, plan.gang_recovery_steps,
                        RUN_TIMEOUT)


def _standby(work: Path, plan: Plan) -> dict[str, Any]:
    return standby.measure(work, plan.standby_steps, plan.standby_mlx_lm_iters, plan.standby_mlx_lm_leak_mb,
                           plan.standby_idle_steps, plan.standby_pairs, RUN_TIMEOUT)


SECTIONS: list[tuple[str, Callable[[Path, Plan], dict[str, Any]]]] = [
    ("overhead", _overhead), ("reaction", _reaction), ("goodput", _goodput), ("checkpoint", _checkpoint),
    ("control", _control), ("daemon", _daemon), ("mlx_lm", _mlx_lm), ("gang", _gang), ("forensics", _forensics),
    ("dashboard", _dashboard), ("standby", _standby),
]


def run_sections(work: Path, plan: Plan, only: set[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Run each section in its own work dir; a failing section is recorded and the rest still run."""
    details: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for name, section in SECTIONS:
        if only and name not in only:
            continue
        started = time.monotonic()
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        try:
            details[name] = section(work / name, plan)
        except SECTION_ERRORS as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
            details[name] = {}
            print(f"bench: {name} failed: {errors[name]}", file=sys.stderr, flush=True)
        details.setdefault(name, {})["section_seconds"] = round(time.monotonic() - started, 1)
    return details, errors


def collect(details: dict[str, Any]) -> dict[str, Any]:
    """The headline metrics, flattened from the sections' details."""
    over, react = details.get("overhead", {}), details.get("reaction", {})
    good, ckpt, ctl = details.get("goodput", {}), details.get("checkpoint", {}), details.get("control", {})
    adaptive = good.get("arms", {}).get("supervised", {})
    recovery = adaptive.get("recovery") or {}
    if not recovery.get("cycles") and react.get("cycles"):
        recovery = analysis.summarize_cycles(react["cycles"])
    return {
        "overhead_ratio": over.get("overhead_ratio"), "overhead_ratio_ci95": over.get("overhead_ratio_ci95"),
        "overhead_cpu_ratio": over.get("overhead_cpu_ratio"),
        "reaction_ms": react.get("reaction_ms"), "exit_ms": react.get("exit_ms"),
        "overshoot_fraction": react.get("overshoot_fraction"), "overshoot_bytes": react.get("overshoot_bytes"),
        "recovery_seconds": recovery.get("total"), "recovery_seconds_max": recovery.get("total_max"),
        "recovery_phases": {k: recovery.get(k) for k in (*analysis.PHASES, "cycles")},
        "goodput": {k: good.get("goodput", {}).get(k) for k in ("unsupervised", "stop_at_limit", "shrink_only",
                                                                "supervised")},
        "samples_over_kill": good.get("samples_over_kill"),
        "checkpoint_save_ratio": ckpt.get("checkpoint_save_ratio"),
        "checkpoint_load_ratio": ckpt.get("checkpoint_load_ratio"),
        "control_p99_ms": ctl.get("control_p99_ms"), "telemetry_msgs_per_s": ctl.get("telemetry_msgs_per_s"),
        "daemon_idle_cpu_fraction": ctl.get("daemon_idle_cpu_fraction"),
        "daemon_rss_bytes": ctl.get("daemon_rss_bytes"),
        "mlx_lm_ratio": details.get("mlx_lm", {}).get("mlx_lm_ratio"),
        "gang_step_rate_ratio": details.get("gang", {}).get("gang_step_rate_ratio"),
        "gang_recovery_seconds": details.get("gang", {}).get("gang_recovery_seconds"),
        **_daemon_metrics(details.get("daemon", {})),
        "standby": {k: details.get("standby", {}).get(k) for k in ("recovery_seconds", "mlx_lm_recovery_seconds",
                                                                  "goodput", "footprint_bytes", "samples_over_kill")},
    }


def _daemon_metrics(daemon: dict[str, Any]) -> dict[str, Any]:
    """The step-rate sweep and the 16-job figures: daemon CPU per 1000 telemetry messages and per second."""
    sweep, sixteen = daemon.get("sweep", {}), daemon.get("sixteen_jobs", {})
    by_rate = {str(row["rate"]): row for row in sweep.get("rates", [])}
    return {
        "daemon_cpu_ms_per_1000_msgs": {rate: row.get("daemon_cpu_ms_per_1000_msgs") for rate, row in by_rate.items()},
        "daemon_cpu_fraction_by_rate": {rate: row.get("daemon_cpu_fraction") for rate, row in by_rate.items()},
        "daemon_sweep_fit": {"fixed": sweep.get("fixed_cpu_fraction"),
                             "marginal": sweep.get("marginal_cpu_ms_per_1000_msgs")},
        "sixteen_jobs": {k: sixteen.get(k) for k in ("daemon_cpu_fraction", "daemon_cpu_ms_per_1000_msgs",
                                                     "steps_per_s", "control_p50_ms", "control_p99_ms")},
    }


def _plots(details: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """Memory plots of the adaptive leak run and the peak run, when matplotlib is installed."""
    from supervisor.tools.plot import PlotError, limits_from_summary, plot_job

    jobs = {"leak-adaptive": details.get("goodput", {}).get("arms", {}).get("supervised", {}).get("job_dir"),
            "peak-reaction": details.get("reaction", {}).get("job_dir")}
    made: dict[str, str] = {}
    for name, job_dir in jobs.items():
        if not job_dir:
            continue
        summary = Path(job_dir).parents[2] / "summary.json"  # <work>/state/jobs/<job> -> <work>/summary.json
        try:
            limits = limits_from_summary(summary) if summary.exists() else None
            made[name] = str(plot_job(Path(job_dir), out_dir / f"{name}.png", limits))
        except (PlotError, OSError, ValueError) as exc:
            made[name] = f"not drawn: {exc}"
    return made


def _meta(mode: str, seconds: float) -> dict[str, Any]:
    return {"mode": mode, "runtime_seconds": round(seconds, 1), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "cpus": os.cpu_count(), "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(), "platform": platform.platform()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (about a minute), for tests")
    parser.add_argument("--out", type=Path, default=ROOT / ".bench" / "results.json")
    parser.add_argument("--work-dir", type=Path, default=None, help="default: <out dir>/work (wiped first)")
    parser.add_argument("--only", action="append", default=[], choices=[name for name, _ in SECTIONS],
                        help="run only this section (repeatable)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    plan, mode = (QUICK, "quick") if args.quick else (FULL, "full")
    work = args.work_dir or args.out.parent / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    started = time.monotonic()
    details, errors = run_sections(work, plan, set(args.only))
    results = collect(details)
    results["plots"] = _plots(details, args.out.parent)
    results["details"] = details
    results["errors"] = errors
    results["meta"] = _meta(mode, time.monotonic() - started)
    rows = report.checks(results)
    results["checks"] = rows
    atomic_write_json(args.out, results)
    print(report.render(rows))
    print(f"\n{mode} run: {results['meta']['runtime_seconds']} s; results in {args.out}")
    for name, message in errors.items():
        print(f"section {name} failed: {message}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
