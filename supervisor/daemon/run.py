"""``mlxsupd run``: supervise one job in the foreground until it finishes or gives up, then summarise."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from typing import IO, Any

from protocol.durable import write_durably
from supervisor.config import Config
from supervisor.core.sizes import format_bytes
from supervisor.core.states import JobState
from supervisor.daemon.job import Job
from supervisor.daemon.loop import Daemon, NoHooks

OUTCOMES = {JobState.FINISHED: "finished", JobState.FATAL: "fatal"}


def summarize(job: Job, wall_seconds: float) -> dict[str, Any]:
    """The JSON summary of a one-shot run (field names are a contract: extend, never rename).

    Its lists are bounded (``supervisor.core.recent``): ``batch_history`` and ``stop_steps`` keep their last
    entries, with ``batch_changes`` and ``gang_stops`` counting all; the recovery median is over the most recent
    recoveries, its maximum and ``recoveries`` over all of them."""
    stats = job.stats
    guard = job.lifecycle.guard_only  # no steps to count: null, never 0 posing as data
    return {
        "job": job.name,
        "outcome": OUTCOMES.get(job.state, "stopped"),
        "guard_only": guard,
        "target_steps": None if guard else stats.target_steps,
        "steps_completed": None if guard else stats.steps_completed,
        "restarts": stats.restarts,
        "restart_reasons": dict(stats.restart_reasons),
        "first_breach_step": stats.first_breach_step,
        "budget_bytes": job.limits.budget,
        "warn_bytes": job.limits.warn,
        "kill_bytes": job.limits.kill,
        "max_sampled_bytes": stats.max_sampled,
        "samples": stats.samples,
        "samples_over_budget": stats.samples_over_budget,
        "samples_over_kill": stats.samples_over_kill,
        "batch_history": list(stats.batch_history),
        "batch_changes": max(0, stats.batch_history.total - 1),
        "wall_seconds": round(wall_seconds, 3),
        "final_loss": stats.final_loss,
        "recovery_seconds_median": stats.recoveries.median(),
        "recovery_seconds_max": stats.recoveries.max,
        "recoveries": stats.recoveries.total,
        "checkpoint_dir": str(job.paths.checkpoints),
        "history_path": str(job.paths.history),
        # Per rank (a plain job is rank 0): a gang's budget applies to each rank, and its ranks restart together.
        "ranks": [{"rank": rank, "max_sampled_bytes": stats.rank_max_sampled.get(rank, 0),
                   "budget_bytes": job.limits.budget, "restarts": stats.restarts}
                  for rank in job.lifecycle.settings.ranks],
        "stop_steps": list(stats.stop_steps),
        "gang_stops": stats.stop_steps.total,
        # What leaks (overall and per life, the last lives), each cache-clear test, and the censuses taken.
        "leak": job.diagnosis.summary(),
        "cache_clears": job.diagnosis.clears.summary(),
        "censuses": list(job.diagnosis.censuses),
        # The last crash (exit_code or signal, stderr_tail, signature); null when nothing crashed.
        "last_error": stats.last_error,
        # Standbys (standby = "auto"): started, lives begun as a standby's go, the largest standby footprint.
        "standby": {"started": stats.standbys, "used": stats.standbys_used, "max_bytes": stats.standby_max_bytes},
    }


class ProgressLine(NoHooks):
    """One status line, rewritten in place on a terminal, printed every few seconds otherwise."""

    def __init__(self, stream: IO[str], every: float = 5.0) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.every = 0.25 if self.tty else every
        self.last = 0.0

    def on_turn(self, daemon: Daemon, now: float) -> None:
        if now - self.last < self.every:
            return
        self.last = now
        for job in daemon.jobs.values():
            self.stream.write(("\r\x1b[2K" if self.tty else "") + render(job) + ("" if self.tty else "\n"))
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")


def render(job: Job) -> str:
    stats = job.stats
    sampled = stats.max_sampled
    if job.lifecycle.guard_only:
        return (f"{job.name} {job.state.name:<9} guard-only  max {format_bytes(sampled)} / budget "
                f"{format_bytes(job.limits.budget)}  restarts {stats.restarts}")
    return (
        f"{job.name} {job.state.name:<9} step {stats.steps_completed}/{stats.target_steps or '?'}"
        f"  max {format_bytes(sampled)} / budget {format_bytes(job.limits.budget)}"
        f"  batch {job.batch}x{job.accum}  restarts {stats.restarts}  {stats.steps_per_second:.1f} steps/s"
    )


def run_one(config: Config, name: str, summary_path: Path | None, max_seconds: float | None = None,
            max_steps: int | None = None, plot: Path | None = None) -> int:
    """Supervise job ``name`` to the end; exit status 0 when it finished (or did its ``max_steps``), 1 otherwise.

    While it runs, ``mlxsupctl`` reaches it on its run dir; at the end the JSON summary goes to stdout (and
    ``summary_path``) and a short report to stderr."""
    from supervisor.daemon import report
    from supervisor.daemon.foreground import ForegroundService, announced_kind, details, kind_of

    started = time.monotonic()
    progress = ProgressLine(sys.stderr)
    service = ForegroundService(config, name, progress, max_steps)
    daemon = service.daemon
    daemon.install_signal_handlers()
    job = daemon.jobs[name]
    endpoint = service.control.endpoint
    print(f"mlxsupd: running {name} ({announced_kind(job)}, budget {format_bytes(job.limits.budget)}); "
          f"mlxsupctl -s {endpoint} status", file=sys.stderr, flush=True)
    try:
        job.start(daemon.system.now(), "mlxsupd run")
        daemon.run(max_seconds=max_seconds)
    finally:
        progress.close()
        service.close()
        _default_signals()  # the loop's wakeup fd is closed: the report and plot run with the defaults
    summary = summarize(job, time.monotonic() - started)
    summary.update(details(job, kind_of(job), endpoint), max_steps=max_steps,
                   summary_path=str(summary_path.absolute()) if summary_path else None,
                   stopped_at_max_steps=service.reached_max_steps)
    if plot is not None:
        summary.update(_plot(job, plot.absolute()))
    text = json.dumps(summary, indent=2)
    if summary_path is not None:
        write_durably(summary_path, text + "\n")  # F_FULLFSYNC on macOS, as checkpoints are
    print(text)
    sys.stdout.flush()
    sys.stderr.write(report.render(summary))
    return 0 if summary["outcome"] == "finished" or service.reached_max_steps else 1


def _default_signals() -> None:
    signal.set_wakeup_fd(-1)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)


def _plot(job: Job, out: Path) -> dict[str, Any]:
    """Draw the job's memory plot; the summary's plot_path, or plot_error saying why not (never raises)."""
    from supervisor.tools.plot import PlotError, plot_job

    limits = {"warn": job.limits.warn, "budget": job.limits.budget, "kill": job.limits.kill}
    job_dir = (job.paths.telemetry or job.paths.history or out).parent
    try:
        return {"plot_path": str(plot_job(job_dir, out, limits))}
    except (PlotError, OSError) as exc:
        return {"plot_path": None, "plot_error": str(exc)}
