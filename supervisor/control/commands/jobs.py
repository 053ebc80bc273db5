"""Commands about one job: status, start, stop, restart, checkpoint, signal, history (budget: budget.py)."""

from __future__ import annotations

import argparse
import signal as signals
from typing import TYPE_CHECKING, Any, ClassVar

from protocol.control import ControlError
from supervisor.control.access import Role
from supervisor.control.commands.base import ControlCommand, job_of
from supervisor.core.guard import guard_numbers
from supervisor.core.sizes import format_bytes
from supervisor.hostfile import describe as describe_layout

if TYPE_CHECKING:
    from supervisor.daemon.job import Job
    from supervisor.daemon.server import DaemonService

SIGNALS = ("TERM", "KILL", "INT", "HUP", "USR1", "USR2", "STOP", "CONT")


def describe(job: Job) -> dict[str, Any]:
    """The status of a job as plain data (also what `top` shows)."""
    life, stats, limits = job.life, job.stats, job.limits
    estimator = life.estimator if life is not None else None
    return {
        "name": job.name, "state": job.state.name, "pid": job.pid,
        "step": stats.steps_completed, "target_steps": stats.target_steps,
        "steps_per_second": round(stats.steps_per_second, 3), "sampled_bytes": job.last_sampled,
        "max_sampled_bytes": stats.max_sampled, "budget_bytes": limits.budget, "warn_bytes": limits.warn,
        "kill_bytes": limits.kill, "batch": job.batch, "accum": job.accum, "restarts": stats.restarts,
        "leak_bytes_per_step": round(estimator.slope) if estimator else 0,
        "transient_bytes": estimator.transient if estimator else 0,
        "baseline_bytes": estimator.baseline if estimator else None,
        "samples_over_budget": stats.samples_over_budget, "final_loss": stats.final_loss,
        "leak": job.diagnosis.status(),
        "io_errors": dict(job.io_errors), "last_decision": job.last_decision.get(0, ""),
        "last_error": stats.last_error,
        "job_dir": str(job.paths.telemetry.parent) if job.paths.telemetry else None,
        # The worker protocol version negotiated with the current worker (its lowest rank); None before its hello.
        "protocol": job.protocols[min(job.protocols)] if job.protocols else None, **gang_status(job),
        **guard_status(job),
        "restart_reasons": dict(stats.restart_reasons),
        "standby": standby_status(job),
    }


def standby_status(job: Job) -> dict[str, Any] | None:
    """The job's standby (pid, waiting, sampled bytes, why it was killed) while it has one; None otherwise."""
    sb = job.lifecycle.standby
    if sb is None:
        return None
    return {"life": sb.id, "pid": sb.pid, "waiting": sb.ready, "bytes": sb.bytes, "killed": sb.killed or None}


def guard_status(job: Job) -> dict[str, Any]:
    """A guard-only job has no steps, batch or per-step slope: those are null, and its growth per second with
    the predicted time to the budget (``budget_in_seconds``, null when not growing) take their place."""
    if not job.lifecycle.guard_only:
        return {"guard_only": False}
    life = job.life
    growth = guard_numbers(life.lead.growth, job.limits, job.last_sampled, job.system.now()) if life else {
        "growth_bytes_per_second": None, "sampled_seconds": None, "budget_in_seconds": None}
    return {"guard_only": True, "guard": growth, **dict.fromkeys(GUARD_NULLS)}


GUARD_NULLS = ("step", "target_steps", "steps_per_second", "batch", "accum", "leak_bytes_per_step", "transient_bytes",
               "baseline_bytes", "final_loss")


def gang_status(job: Job) -> dict[str, Any]:
    """A gang's shape and every rank (remote ones as their daemon last reported them); nothing for a plain job."""
    if job.layout is None:
        return {}
    lifecycle = job.lifecycle
    ranks = job.rank_rows()
    hosts = []
    for peer in lifecycle.peers.values():
        ranks += [{**row, "host": peer.host} for row in peer.ranks]
        hosts.append({"host": peer.host, "generation": peer.gen, "alive": peer.alive, "want": peer.want,
                      "heard_seconds_ago": round(job.system.now() - peer.heard, 1) if peer.heard > 0 else None})
    gang = {**describe_layout(job.layout), "generation": lifecycle.gen, "stop_steps": lifecycle.stats.stop_steps[-5:],
            "followers": hosts, "backend": job.config.backend}
    if lifecycle.settings.follower:
        heard = job.leader_heard
        gang.update(leader_endpoint=job.config.gang.leader,
                    leader_heard_seconds_ago=round(job.system.now() - heard, 1) if heard is not None else None)
    return {"gang": gang, "ranks": sorted(ranks, key=lambda r: r["rank"])}


def status_line(row: dict[str, Any]) -> str:
    mem = f"{format_bytes(row['sampled_bytes'])}/{format_bytes(row['budget_bytes'])}"
    if row.get("guard_only"):
        growth = row["guard"]["growth_bytes_per_second"]
        grows = f"growth {format_bytes(growth)}/s" if growth is not None else "not sampled yet"
        line = (f"{row['name']:<16} {row['state']:<18} pid {row['pid'] or '-'!s:<7} guard-only    mem {mem:<22} "
                f"{grows}  restarts {row['restarts']}")
    else:
        line = (f"{row['name']:<16} {row['state']:<18} pid {row['pid'] or '-'!s:<7} "
                f"step {row['step']}/{row['target_steps'] or '?':<8} mem {mem:<22} "
                f"batch {row['batch']}x{row['accum']}  restarts {row['restarts']}")
        if row.get("protocol"):
            line += f"  protocol {row['protocol']}"
    error = row.get("last_error")
    if error and row["state"] in ("BACKOFF", "FATAL", "STARTING", "STOPPED"):
        said = next((line.strip() for line in reversed(error["stderr_tail"]) if line.strip()), "")
        how = f"exit {error['exit_code']}" if error["exit_code"] is not None else error["signal"]
        line += f"\n  last error ({how}{', ' + error['signature'] if error['signature'] else ''}): {said[:160]}"
    if "gang" in row:
        gang = row["gang"]
        line += (f"\n  gang: {gang['world']} ranks, generation {gang['generation']}, this host {gang['host']}, "
                 f"backend {gang.get('backend', 'ring')}")
        if "leader_endpoint" in gang:
            heard = gang["leader_heard_seconds_ago"]
            line += f", leader {gang['leader_endpoint']} " + ("never heard" if heard is None else f"heard {heard}s ago")
        line += "".join("\n" + rank_line(r) for r in row["ranks"])
    return line


def rank_line(rank: dict[str, Any]) -> str:
    """One rank of a gang: its step, memory against the per-rank budget, and its last decision."""
    mem = f"{format_bytes(rank['sampled_bytes'])}/{format_bytes(rank['budget_bytes'])}"
    where = f"@{rank['host']}" if rank.get("host") else ""
    decision = f"  last decision: {rank['decision'][:80]}" if rank.get("decision") else ""
    return (f"  rank {rank['rank']}{where:<14} {rank['state']:<9} pid {rank['pid'] or '-'!s:<7} step {rank['step']:<8} "
            f"mem {mem:<22} max {format_bytes(rank['max_sampled_bytes'])}{decision}")


def refuse_while_stopping(daemon: DaemonService, job: Job) -> None:
    """Nothing starts while the daemon shuts down (the signal may not have reached the jobs yet) or while the
    job is being removed from the config."""
    if daemon.daemon.stopping:
        raise ControlError(ControlError.BAD_STATE, "the daemon is shutting down")
    if job.name in daemon.removing:
        raise ControlError(ControlError.BAD_STATE, f"job {job.name} is being removed from the config")


class Status(ControlCommand):
    name = "status"
    help = "state, step, memory and batch of every job (or one)"
    role = Role.READ
    wire: ClassVar[dict[str, tuple[type, bool]]] = {"job": (str, False)}

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("job", nargs="?", help="one job (default: all)")

    def handle(self, daemon: DaemonService, args: dict[str, Any], client: str = "local") -> Any:
        from supervisor.daemon.overview import overview

        jobs = [job_of(daemon, args["job"])] if "job" in args else list(daemon.daemon.jobs.values())
        return {"jobs": [describe(j) for j in jobs], **overview(daemon, client)}

    def render(self, result: Any) -> str:
        return "\n".join(status_line(r) for r in result["jobs"]) or "no jobs configured"


class Start(ControlCommand):
    name = "start"
    help = "start a configured job (resumes from its latest checkpoint)"
    role = Role.OPERATE
    wire: ClassVar[dict[str, tuple[type, bool]]] = {"job": (str, True)}

    def handle(self, daemon: DaemonService, args: dict[str, Any], client: str = "local") -> Any:
        job = job_of(daemon, args["job"])
        refuse_while_stopping(daemon, job)
        job.start(daemon.daemon.system.now(), "start requested", client=client)
        return {"job": job.name, "state": job.state.name}

    def render(self, result: Any) -> str:
        return f"{result['job']}: {result['state']}"


class Stop(ControlCommand):
    name = "stop"
    help = "checkpoint and stop a job"
    role = Role.OPERATE
    wire: ClassVar[dict[str, tuple[type, bool]]] = {"job": (str, True)}

    def handle(self, daemon: DaemonService, args: dict[str, Any], client: str = "local") -> Any:
        job = job_of(daemon, args["job"])
        job.stop(daemon.daemon.system.now(), "stop requested", client=client)
        return {"job": job.name, "state": job.state.name}

    render = Start.render


class Restart(ControlCommand):
    name = "restart"
    help = "checkpoint and stop a job, then start it again"
    role = Role.OPERATE
    wire: ClassVar[dict[str, tuple[type, bool]]] = {"job": (str, True)}

    def handle(self, daemon: DaemonService, args: dict[str, Any], client: str = "local") -> Any:
        job = job_of(daemon, args["job"])
        refuse_while_stopping(daemon, job)
        job.restart(daemon.daemon.system.now(), client=client)
        return {"job": job.name, "state": job.state.name}

    render = Start.render


class Checkpoint(ControlCommand):
    name = "checkpoint"
    help = "ask a running job for a checkpoint at its next step boundary"
    role = Role.OPERATE
    wire: ClassVar[dict[str, tuple[type, bool]]] = {"job": (str, True)}

    def handle(self, daemon: DaemonService, args: dict[str, Any], client: str = "local") -> Any:
        job = job_of(daemon, args["job"])
        job.checkpoint(client=client)
        return {"job": job.name, "requested": True}

    def render(self, result: Any) -> str:
        return f"{result['job']}: checkpoint requested"


class Signal(ControlCommand):
    name = "signal"
    help = f"send a signal to a job's process group ({', '.join(SIGNALS)})"
    role = Role.ADMIN  # KILL loses the steps since the last checkpoint; STOP looks like a hang
    wire: ClassVar[dict[str, tuple[type, bool]]] = {"job": (str, True), "signal": (str, True)}

    def handle(self, daemon: DaemonService, args: dict[str, Any], client: str = "local") -> Any:
        job = job_of(daemon, args["job"])
        name = args["signal"].upper().removeprefix("SIG")
        if name not in SIGNALS:
            raise ControlError(ControlError.BAD_VALUE, f"signal {args['signal'][:16]!r} is not one of {SIGNALS}")
        if not job.signal(getattr(signals, f"SIG{name}"), client=client):
            raise ControlError(ControlError.BAD_STATE, f"job {job.name} has no running worker")
        return {"job": job.name, "signal": f"SIG{name}"}

    def render(self, result: Any) -> str:
        return f"{result['job']}: sent {result['signal']}"


class History(ControlCommand):
    name = "history"
    help = "a job's recorded events: starts, exits with reasons, breaches, batch changes, checkpoints"
    role = Role.READ
    wire: ClassVar[dict[str, tuple[type, bool]]] = {"job": (str, True), "limit": (int, False)}

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("job")
        parser.add_argument("-n", "--limit", type=int, default=50,
                            help="last N events (default 50, at most 10000; past the 200 the daemon keeps in memory, "
                                 "read back across the rotated history files)")

    def handle(self, daemon: DaemonService, args: dict[str, Any], client: str = "local") -> Any:
        job = job_of(daemon, args["job"])
        return {"job": job.name, "events": job.history.recent(int(args.get("limit", 50)))}

    def render(self, result: Any) -> str:
        import datetime

        lines = []
        for event in result["events"]:
            when = datetime.datetime.fromtimestamp(event.get("time", 0)).strftime("%Y-%m-%d %H:%M:%S")
            rest = " ".join(f"{k}={v}" for k, v in event.items() if k not in ("time", "event"))
            lines.append(f"{when} {event.get('event', '?'):<12} {rest}")
        return "\n".join(lines) or "no history"
