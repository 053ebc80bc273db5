"""Commands about what leaks: ``explain`` (the verdict in words) and ``diagnose`` (a census of the loop)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any, ClassVar

from protocol.control import ControlError
from supervisor.control.access import Role
from supervisor.control.commands.base import ControlCommand, job_of
from supervisor.core.sizes import format_bytes
from supervisor.daemon import leaks

if TYPE_CHECKING:
    from supervisor.daemon.server import DaemonService


def slopes_line(entry: dict[str, Any]) -> str:
    """``footprint 40.0 MiB (39.8..40.2), active ...`` per step or second; "not measured" for an absent one."""
    parts = []
    for name, slope in entry.get("slopes", {}).items():
        if slope is None:
            parts.append(f"{name} not measured")
            continue
        low, high = entry["interval"][name]
        parts.append(f"{name} {format_bytes(round(slope))} ({format_bytes(round(low))}..{format_bytes(round(high))})")
    return f"per {entry.get('per', 'step')} (95% interval): " + ", ".join(parts) if parts else ""


def explain_lines(name: str, leak: dict[str, Any], summary: dict[str, Any], clears: dict[str, Any],
                  census: dict[str, Any] | None) -> list[str]:
    """The verdict of the current (or last) life in words, its fixes, the cache-clear tests and the census."""
    steps = f", {leak['steps']} steps" if leak.get("steps") else ""
    lines = [f"{name}: {leak['verdict']} (life {leak.get('life', '-')}{steps})", f"  {leak['meaning']}"]
    if slopes := slopes_line(leak):
        lines.append(f"  {slopes}")
    lines += [f"  fix: {fix}" for fix in leak.get("fixes", [])]
    if clears["sent"]:
        lines.append(f"  cache clears: {clears['sent']} asked, {clears['measured']} measured, growth went on after "
                     f"{clears['growth_went_on']}")
        lines += [f"    step {c['step']}: {c['text']}" for c in clears["last"][-3:]]
    if census is not None:
        lines.append(f"  census, steps {census['first_step']}..{census['last_step']} "
                     f"({census['seconds'] * 1000:.1f} ms{'' if census['complete'] else ', walk bounded'}):")
        lines += [f"    {h['text']}" for h in census["holders"][:5]] or ["    nothing grew"]
    if summary["lives_total"] > 1:
        counts = ", ".join(f"{v} {n}" for v, n in sorted(summary["verdicts"].items()))
        lines.append(f"  over {summary['lives_total']} lives: {counts}; overall {summary['overall']['verdict']}")
    return lines


class Explain(ControlCommand):
    name = "explain"
    help = "say in words what leaks in a job (arrays, MLX's cache, outside MLX), what clearing did, and the fixes"
    role = Role.READ
    wire: ClassVar[dict[str, tuple[type, bool]]] = {"job": (str, True)}

    def handle(self, daemon: DaemonService, args: dict[str, Any], client: str = "local") -> Any:
        job = job_of(daemon, args["job"])
        diagnosis = job.diagnosis
        return {"job": job.name, "leak": diagnosis.status(), "summary": diagnosis.summary(),
                "cache_clears": diagnosis.clears.summary(),
                "census": diagnosis.censuses[-1] if diagnosis.censuses else None}

    def render(self, result: Any) -> str:
        return "\n".join(explain_lines(result["job"], result["leak"], result["summary"], result["cache_clears"],
                                       result["census"]))


class Diagnose(ControlCommand):
    name = "diagnose"
    help = "ask a job's worker (Python SDK) for two censuses N steps apart: which names in its loop hold growth"
    role = Role.OPERATE
    wire: ClassVar[dict[str, tuple[type, bool]]] = {"job": (str, True), "steps": (int, False)}

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("job")
        parser.add_argument("--steps", type=int, default=leaks.DEFAULT_CENSUS_STEPS,
                            help=f"steps between the two censuses (default {leaks.DEFAULT_CENSUS_STEPS}); "
                                 "`explain JOB` shows the answer")

    def handle(self, daemon: DaemonService, args: dict[str, Any], client: str = "local") -> Any:
        job = job_of(daemon, args["job"])
        steps = int(args.get("steps", leaks.DEFAULT_CENSUS_STEPS))
        if not 1 <= steps <= leaks.MAX_CENSUS_STEPS:
            raise ControlError(ControlError.BAD_VALUE, f"steps must be 1..{leaks.MAX_CENSUS_STEPS}, got {steps}")
        try:
            asked = leaks.ask_census(job, steps, f"diagnose by {client}", daemon.daemon.system.now())
        except leaks.CensusRefused as exc:
            raise ControlError(ControlError.BAD_STATE, f"{job.name}: {exc}") from None
        return {"job": job.name, **asked}

    def render(self, result: Any) -> str:
        return (f"{result['job']}: census asked over {result['steps']} steps from step {result['from_step']}; "
                f"`mlxsupctl explain {result['job']}` shows what grew")
