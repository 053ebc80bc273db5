"""Control commands: one registry shared by the daemon's dispatcher and mlxsupctl."""

from __future__ import annotations

from protocol.control import ControlError
from supervisor.control.commands.base import ControlCommand
from supervisor.control.commands.budget import Budget
from supervisor.control.commands.daemon import Audit, Help, Reread, Shutdown, Update, Version
from supervisor.control.commands.diagnosis import Diagnose, Explain
from supervisor.control.commands.gang import GangSync
from supervisor.control.commands.jobs import Checkpoint, History, Restart, Signal, Start, Status, Stop
from supervisor.control.commands.tail import Tail

REGISTRY: dict[str, ControlCommand] = {
    command.name: command
    for command in (Status(), Start(), Stop(), Restart(), Checkpoint(), Tail(), Budget(), Signal(), History(),
                    Reread(), Update(), Shutdown(), Version(), Help(), Audit(), GangSync(), Explain(), Diagnose())
}

# What mlxsupctl offers (the daemons' own exchanges, such as gang-sync, are not typed by people).
CLI_COMMANDS: dict[str, ControlCommand] = {name: command for name, command in REGISTRY.items() if command.cli}

__all__ = ["CLI_COMMANDS", "REGISTRY", "ControlCommand", "ControlError"]
