"""Commands about the daemon itself: reread, update, shutdown, version, help, audit."""

from __future__ import annotations

import argparse
import datetime
import json
from typing import TYPE_CHECKING, Any, ClassVar

from supervisor.control.access import Role
from supervisor.control.commands.base import ControlCommand

if TYPE_CHECKING:
    from supervisor.daemon.server import DaemonService

def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mlx-supervisor")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


class Reread(ControlCommand):
    name = "reread"
    help = "reload the config file and report added, removed and changed jobs (nothing is applied)"
    role = Role.ADMIN  # it decides what the next update applies

    def handle(self, daemon: DaemonService, args: dict[str, Any], client: str = "local") -> Any:
        return daemon.reread()

    def render(self, result: Any) -> str:
        parts = [f"{k}: {', '.join(v)}" for k, v in result.items() if v]
        return "; ".join(parts) or "no config changes"


class Update(ControlCommand):
    name = "update"
    help = "apply the reread config: start new autostart jobs, checkpoint and remove dropped ones"
    role = Role.ADMIN  # it also reloads the allow-list of keys and their roles

    def handle(self, daemon: DaemonService, args: dict[str, Any], client: str = "local") -> Any:
        return daemon.update(client)

    render = Reread.render


class Shutdown(ControlCommand):
    name = "shutdown"
    help = "checkpoint every job and stop the daemon"
    role = Role.ADMIN

    def handle(self, daemon: DaemonService, args: dict[str, Any], client: str = "local") -> Any:
        daemon.daemon.stopped_by = client
        daemon.daemon.stopping = True
        return {"shutting_down": True, "jobs": sorted(daemon.daemon.jobs)}

    def render(self, result: Any) -> str:
        return "shutting down: every job checkpoints first"


class Version(ControlCommand):
    name = "version"
    help = "versions of the daemon and its protocols; counters of refused requests and audit records"
    role = Role.READ

    def handle(self, daemon: DaemonService, args: dict[str, Any], client: str = "local") -> Any:
        from protocol import PROTOCOL_VERSION
        from protocol.control import CONTROL_VERSION

        return {"version": _version(), "worker_protocol": PROTOCOL_VERSION, "control_protocol": CONTROL_VERSION,
                "control": daemon.control.audit.counters()}

    def render(self, result: Any) -> str:
        control = result.get("control", {})
        refused = ", ".join(f"{n} {reason}" for reason, n in sorted(control.get("refused", {}).items())) or "none"
        return (f"mlxsupd {result['version']} (worker protocol {result['worker_protocol']}, control protocol "
                f"{result['control_protocol']})\nrefused requests: {refused}; audit records written "
                f"{control.get('audit_records', 0)}, write failures {control.get('audit_write_failures', 0)}")


class Help(ControlCommand):
    name = "help"
    help = "list the daemon's commands and the role each needs"
    role = Role.READ

    def handle(self, daemon: DaemonService, args: dict[str, Any], client: str = "local") -> Any:
        from supervisor.control.commands import REGISTRY

        return {"commands": {name: command.help for name, command in sorted(REGISTRY.items())},
                "roles": {name: command.role.label for name, command in sorted(REGISTRY.items())}}

    def render(self, result: Any) -> str:
        roles = result.get("roles", {})
        return "\n".join(f"{name:<12} {roles.get(name, ''):<8} {text}" for name, text in result["commands"].items())


class Audit(ControlCommand):
    name = "audit"
    help = "the audit trail: who changed what (and refused attempts), newest last"
    role = Role.ADMIN  # it names every client and what each asked for
    changes = False
    wire: ClassVar[dict[str, tuple[type, bool]]] = {"limit": (int, False)}

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("-n", "--limit", type=int, default=50, help="last N records (default 50)")

    def handle(self, daemon: DaemonService, args: dict[str, Any], client: str = "local") -> Any:
        return {"records": daemon.control.audit.tail(int(args.get("limit", 50))),
                **daemon.control.audit.counters()}

    def render(self, result: Any) -> str:
        lines = []
        for record in result["records"]:
            when = datetime.datetime.fromtimestamp(record.get("time", 0)).strftime("%Y-%m-%d %H:%M:%S")
            outcome = record.get("error") or "ok"
            args = json.dumps(record.get("args", {}), default=str, separators=(",", ":"))
            lines.append(f"{when} {record.get('client', '?')!s:<16} {record.get('command', '?')!s:<10} "
                         f"{outcome:<16} {args}")
        return "\n".join(lines) or "no audit records"
