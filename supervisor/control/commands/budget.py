"""``budget``: show a job's memory bands, or change them live, refusing a change that cannot work."""

from __future__ import annotations

import argparse
import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar

from protocol.control import ControlError
from supervisor.config import check_limits
from supervisor.control.access import Role
from supervisor.control.commands.base import ControlCommand, job_of
from supervisor.core.sizes import SizeError, format_bytes

if TYPE_CHECKING:
    from supervisor.core.policy import Limits
    from supervisor.daemon.job import Job
    from supervisor.daemon.server import DaemonService


class Budget(ControlCommand):
    name = "budget"
    help = ("show a job's budget, or change it live (bytes, percent of total, or 'total - X'); a budget below "
            "the job's measured baseline is refused unless --force")
    role = Role.OPERATE  # to change it; showing it is read
    wire: ClassVar[dict[str, tuple[type, bool]]] = {"job": (str, True), "value": (str, False), "force": (bool, False)}

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("job")
        parser.add_argument("value", nargs="?", help="new budget, e.g. 12GiB, 60%%, 'total - 8GiB'")
        parser.add_argument("--force", action="store_true", default=None,
                            help="apply a budget the sanity checks refuse (recorded in the audit trail)")

    def required_role(self, args: dict[str, Any]) -> Role:
        return self.role if "value" in args else Role.READ

    def handle(self, daemon: DaemonService, args: dict[str, Any], client: str = "local") -> Any:
        job = job_of(daemon, args["job"])
        if "value" in args:
            try:
                limits = dataclasses.replace(job.config, budget=args["value"]).limits(daemon.daemon.total_memory)
                check_limits(limits)  # never forced: the escalation needs its bands in order
            except SizeError as exc:
                raise ControlError(ControlError.BAD_VALUE, f"budget for {job.name}: {exc}") from None
            problems = budget_problems(job, limits)
            if problems and not args.get("force"):
                raise ControlError(ControlError.BAD_VALUE, f"budget {args['value'][:32]!r} for {job.name} refused: "
                                   + "; ".join(problems) + " (--force applies it anyway)")
            job.set_limits(limits, client=client)
        lim = job.limits
        return {"job": job.name, "budget_bytes": lim.budget, "warn_bytes": lim.warn, "kill_bytes": lim.kill}

    def render(self, result: Any) -> str:
        return (f"{result['job']}: budget {format_bytes(result['budget_bytes'])} (warn "
                f"{format_bytes(result['warn_bytes'])}, kill {format_bytes(result['kill_bytes'])})")


def budget_problems(job: Job, limits: Limits) -> list[str]:
    """Why ``limits`` would not work for ``job`` now (``--force`` overrides): under the measured baseline, or a
    kill ceiling the worker is already above (it would be killed at once, without a checkpoint)."""
    problems = []
    life = job.life
    baseline = life.estimator.baseline if life is not None else None
    if baseline is not None and limits.budget < baseline:
        problems.append(f"budget {format_bytes(limits.budget)} is below the job's measured baseline "
                        f"{format_bytes(baseline)} (its footprint between steps): no batch size fits under it")
    if life is not None and job.last_sampled and limits.kill <= job.last_sampled:
        problems.append(f"kill ceiling {format_bytes(limits.kill)} is at or below the current footprint "
                        f"{format_bytes(job.last_sampled)}: the worker would be killed at once, without a checkpoint")
    return problems
