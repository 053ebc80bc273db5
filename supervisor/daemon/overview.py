"""What ``status`` tells about the daemon itself, the machine and the asking client (beside the jobs).

Read by ``mlxsupctl dashboard`` and ``mlxsupctl metrics``: the daemon's CPU time, RSS and version, the
system's available memory against the floor and the pressure level, and the name and role of the key that
asked (so a page shows control buttons only when the key may use them).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import psutil

from supervisor.control.access import LOCAL, LOOPBACK

if TYPE_CHECKING:
    from supervisor.daemon.server import DaemonService

_SELF: psutil.Process | None = None


def _process() -> psutil.Process:
    global _SELF
    if _SELF is None or _SELF.pid != os.getpid():
        _SELF = psutil.Process()
    return _SELF


def overview(service: DaemonService, client: str) -> dict[str, Any]:
    """The ``daemon``, ``system`` and ``client`` parts of a status reply."""
    from supervisor.control.commands.daemon import _version

    daemon = service.daemon
    proc = _process()
    try:
        times = proc.cpu_times()
        cpu, rss = times.user + times.system, proc.memory_info().rss
    except psutil.Error:  # pragma: no cover - our own process
        cpu, rss = 0.0, 0
    available, total = daemon.system.memory()
    return {
        "daemon": {"version": _version(), "pid": os.getpid(), "cpu_seconds": round(cpu, 3), "rss_bytes": rss},
        "system": {"available_bytes": available, "total_bytes": total, "floor_bytes": daemon.floor,
                   "pressure": daemon.system.pressure()},
        "client": {"name": client, "role": _role(service, client)},
    }


def _role(service: DaemonService, client: str) -> str:
    if client in (LOCAL.name, LOOPBACK.name):
        return LOCAL.role.label
    for principal in service.control.keys.values():
        if principal.name == client:
            return principal.role.label
    return "read"
