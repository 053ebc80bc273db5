"""The daemon of ``mlxsupd run``: one job in the foreground, with the control plane of the service.

``mlxsupctl`` reaches it on its run dir (status, top, tail -f, stop, checkpoint, plot) as it would the service;
a reread has no file to read in the one-line form and is refused. The loop also draws the progress line and
ends a measuring run (``--max-steps``) with a checkpoint once its steps are done.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from protocol.control import ControlError
from protocol.messages import EXIT_CHECKPOINTED
from supervisor.config import Config
from supervisor.core.policy import theil_sen
from supervisor.daemon.job import Job
from supervisor.daemon.loop import Daemon, NoHooks
from supervisor.daemon.recorder import read_records
from supervisor.daemon.server import DaemonService
from supervisor.daemon.tails import stderr_tail

MAX_SLOPE_POINTS = 200  # Theil-Sen is quadratic in its points: the last life's samples, evenly thinned


class ForegroundService(DaemonService):
    """DaemonService over one job, ending with it (one-shot), with a progress line and a step limit."""

    def __init__(self, config: Config, name: str, progress: NoHooks, max_steps: int | None = None) -> None:
        super().__init__(config, job_names=[name], one_shot=True)
        self.name = name
        self.progress = progress
        self.max_steps = max_steps
        self.reached_max_steps = False

    @property
    def job(self) -> Job:
        return self.daemon.jobs[self.name]

    def on_turn(self, daemon: Daemon, now: float) -> None:
        super().on_turn(daemon, now)
        self.progress.on_turn(daemon, now)
        if self.max_steps and not daemon.stopping and self.job.stats.steps_completed >= self.max_steps:
            self.reached_max_steps = True
            daemon.stopped_by = f"--max-steps {self.max_steps}"
            daemon.stopping = True  # every job checkpoints and exits, as at a shutdown

    def reread(self) -> dict[str, list[str]]:
        raise ControlError(ControlError.BAD_STATE, "a foreground run (mlxsupd run) does not reload its config: "
                           "stop it and run it again")


def last_exit(events: list[dict[str, Any]]) -> int | None:
    """The exit code of the job's last worker (negative: killed by that signal), from its history."""
    exits = [e for e in events if e.get("event") == "exit" and isinstance(e.get("code"), int)]
    return int(exits[-1]["code"]) if exits else None


def slope_per_second(telemetry: Path | None, since: float | None) -> float | None:
    """Theil-Sen growth of the sampled footprint, bytes per second, over the samples since ``since`` (the last
    spawn); None with fewer than 4 samples."""
    if telemetry is None:
        return None
    samples = [(float(r["t"]), int(r["bytes"])) for r in read_records(telemetry)
               if r.get("k") == "sample" and isinstance(r.get("t"), int | float)
               and isinstance(r.get("bytes"), int) and (since is None or r["t"] >= since)]
    if len(samples) < 4:
        return None
    stride = math.ceil(len(samples) / MAX_SLOPE_POINTS)
    thinned = samples[::stride]
    t0 = thinned[0][0]
    # theil_sen takes integer x: milliseconds keep the resolution of 20 Hz samples.
    return theil_sen([(round((t - t0) * 1000), b) for t, b in thinned]) * 1000


def details(job: Job, kind: str, endpoint: str) -> dict[str, Any]:
    """Fields of the summary beyond ``run.summarize``'s: where things are and how the command last ended."""
    events = job.history.events
    spawns = [e for e in events if e.get("event") == "spawn" and isinstance(e.get("time"), int | float)]
    code = last_exit(events)
    return {
        "kind": kind,
        "command": list(job.config.command),
        "log_dir": str(job.paths.logs),
        "telemetry_path": str(job.paths.telemetry) if job.paths.telemetry else None,
        "control_endpoint": endpoint,
        "last_exit_code": code,
        "last_stderr": _last_lines(job.paths.logs / "stderr.log") if _error_exit(code) else [],
        "footprint_bytes_per_second": _rounded(slope_per_second(job.paths.telemetry,
                                                                spawns[-1]["time"] if spawns else None)),
    }


def _error_exit(code: int | None) -> bool:
    """An exit of the worker's own making that was no success (not a signal, not a checkpoint-and-exit)."""
    return code is not None and code > 0 and code != EXIT_CHECKPOINTED


def _last_lines(path: Path, lines: int = 8) -> list[str]:
    """The last non-blank lines of a worker's stderr log (its own error), through the job's bounded tail read."""
    return [line.rstrip()[:300] for line in stderr_tail(path) if line.strip()][-lines:]


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def announced_kind(job: Job) -> str:
    """The kind said at the start: with sdk = "auto" it is learned from the first hello."""
    if job.config.sdk == "auto" and not job.config.mlx_lm:
        return "sdk auto: guarded by sampling until its worker says hello"
    return kind_of(job)


def kind_of(job: Job) -> str:
    """sdk, guard-only or mlx-lm: which words the report uses."""
    if job.config.mlx_lm:
        return "mlx-lm"
    return "guard-only" if job.lifecycle.guard_only else "sdk"
