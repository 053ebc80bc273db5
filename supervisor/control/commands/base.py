"""The control-command framework: one small class per command, one explicit registry.

A command declares its name, help, the role it needs, whether it changes anything (then it is audited), wire
arguments (name -> type, required), CLI arguments, daemon-side handler and human rendering. The daemon's
dispatcher and mlxsupctl both read the same registry.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any, ClassVar

from protocol.control import ControlError
from supervisor.control.access import Role

if TYPE_CHECKING:
    from supervisor.daemon.job import Job
    from supervisor.daemon.server import DaemonService


class ControlCommand:
    """Base of every command. Subclasses set the class attributes and override what they need."""

    name: ClassVar[str]
    help: ClassVar[str]
    # Who may run it. Unset means admin and audited: a new command is locked down until it says otherwise.
    role: ClassVar[Role] = Role.ADMIN
    # Changes something: every request above role read is appended to the audit trail (False: not even those,
    # for an admin command that only reads or a daemon-to-daemon exchange recorded in the job's history).
    changes: ClassVar[bool] = True
    cli: ClassVar[bool] = True  # False: daemon to daemon only, not an mlxsupctl command
    # Wire shape: argument -> (type, required). Anything else in a request is rejected.
    wire: ClassVar[dict[str, tuple[type, bool]]] = {}

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """CLI arguments; by default one positional per required wire argument named like it."""
        for arg, (_, required) in self.wire.items():
            if required:
                parser.add_argument(arg)

    def to_wire(self, args: argparse.Namespace) -> dict[str, Any]:
        return {k: getattr(args, k) for k in self.wire if getattr(args, k, None) is not None}

    def check(self, args: dict[str, Any]) -> dict[str, Any]:
        """Validate a request's arguments against ``wire``; ControlError names the bad one."""
        for key, value in args.items():
            if key not in self.wire:
                raise ControlError(ControlError.BAD_REQUEST, f"{self.name}: unknown argument {key!r}")
            kind = self.wire[key][0]
            if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
                raise ControlError(ControlError.BAD_REQUEST,
                                   f"{self.name}: argument {key!r} must be {kind.__name__}, got {type(value).__name__}")
        for key, (_, required) in self.wire.items():
            if required and key not in args:
                raise ControlError(ControlError.BAD_REQUEST, f"{self.name}: missing argument {key!r}")
        return args

    def required_role(self, args: dict[str, Any]) -> Role:
        """The role a request needs (a command whose reading and writing forms differ overrides this)."""
        return self.role

    def changes_state(self, args: dict[str, Any]) -> bool:
        """Whether a request may change something, and so goes to the audit trail (what role read may ask never
        does)."""
        return self.changes and self.required_role(args) > Role.READ

    def handle(self, daemon: DaemonService, args: dict[str, Any], client: str = "local") -> Any:
        """Carry out a checked request for ``client`` (the key's name, or "local"); ControlError on refusal."""
        raise NotImplementedError

    def render(self, result: Any) -> str:
        """Human output of a result (``--json`` prints the result itself)."""
        return json.dumps(result, indent=2, default=str)


def job_of(daemon: DaemonService, name: Any) -> Job:
    """The configured job called ``name``; only jobs in the config exist, nothing from the wire is run."""
    job = daemon.daemon.jobs.get(name) if isinstance(name, str) else None
    if job is None:
        known = ", ".join(sorted(daemon.daemon.jobs)) or "none"
        raise ControlError(ControlError.NO_SUCH_JOB, f"no job {str(name)[:64]!r} in the config (jobs: {known})")
    return job
