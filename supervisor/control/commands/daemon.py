"""Commands about the daemon itself: reread, update, shutdown, version, help."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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

    def handle(self, daemon: DaemonService, args: dict[str, Any]) -> Any:
        return daemon.reread()

    def render(self, result: Any) -> str:
        parts = [f"{k}: {', '.join(v)}" for k, v in result.items() if v]
        return "; ".join(parts) or "no config changes"


class Update(ControlCommand):
    name = "update"
    help = "apply the reread config: start new autostart jobs, checkpoint and remove dropped ones"

    def handle(self, daemon: DaemonService, args: dict[str, Any]) -> Any:
        return daemon.update()

    render = Reread.render


class Shutdown(ControlCommand):
    name = "shutdown"
    help = "checkpoint every job and stop the daemon"

    def handle(self, daemon: DaemonService, args: dict[str, Any]) -> Any:
        daemon.daemon.stopping = True
        return {"shutting_down": True, "jobs": sorted(daemon.daemon.jobs)}

    def render(self, result: Any) -> str:
        return "shutting down: every job checkpoints first"


class Version(ControlCommand):
    name = "version"
    help = "versions of the daemon and its protocols"

    def handle(self, daemon: DaemonService, args: dict[str, Any]) -> Any:
        from protocol import PROTOCOL_VERSION
        from protocol.control import CONTROL_VERSION

        return {"version": _version(), "worker_protocol": PROTOCOL_VERSION, "control_protocol": CONTROL_VERSION}

    def render(self, result: Any) -> str:
        return f"mlxsupd {result['version']} (worker protocol {result['worker_protocol']}, " \
               f"control protocol {result['control_protocol']})"


class Help(ControlCommand):
    name = "help"
    help = "list the daemon's commands"

    def handle(self, daemon: DaemonService, args: dict[str, Any]) -> Any:
        from supervisor.control.commands import REGISTRY

        return {"commands": {name: command.help for name, command in sorted(REGISTRY.items())}}

    def render(self, result: Any) -> str:
        return "\n".join(f"{name:<12} {text}" for name, text in result["commands"].items())
