"""A throwaway LaunchAgent under ``gui/$UID``: bootstrapped, inspected, and booted out again whatever happens.

Used by the Mac acceptance kit (``mlxsupctl doctor --deep``) and by tests/test_darwin_real.py. It goes through the
same ``Launchd`` manager as ``mlxsupctl service`` (bootout waits until the job has left its domain; bootstrap is
retried on errors 5 and 37), with a label of its own so it never touches an installed mlxsupd service.
"""

from __future__ import annotations

import os
import plistlib
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from supervisor.install.managers import Launchd, ManagerError, ServiceState, run_command

LABEL_PREFIX = "com.mlx-supervisor.throwaway"
EXIT_TIMEOUT = 10.0  # s the throwaway job gets to leave its domain after bootout (plus the manager's margin)
# `launchctl print` says how launchd treats the job's ProcessType as "spawn type = interactive (N)" or similar.
_SPAWN_TYPE = re.compile(r"^\s*spawn type = (\w+)", re.MULTILINE)


class AgentUnavailable(RuntimeError):
    """There is no gui/$UID domain to bootstrap into (no one is logged in at the GUI, e.g. over ssh)."""


@dataclass
class Agent:
    """A bootstrapped throwaway agent."""

    label: str
    plist: Path
    launchd: Launchd

    def printed(self) -> str:
        """What ``launchctl print gui/$UID/LABEL`` says (empty when the job is not loaded)."""
        status, output = run_command(["launchctl", "print", self.launchd.target], 30.0)
        return output if status == 0 else ""

    def state(self) -> ServiceState:
        return self.launchd.state()

    def loaded(self) -> bool:
        return self.state().loaded

    def process_type(self) -> str | None:
        """The ProcessType launchd applies, from print's spawn type (``Interactive``...); None when not printed."""
        found = _SPAWN_TYPE.search(self.printed())
        return found.group(1).capitalize() if found else None


def agent_plist(label: str, program: list[str], log_dir: Path, process_type: str = "Interactive") -> bytes:
    """A minimal LaunchAgent plist: run ``program`` once at load, keep nothing alive."""
    return plistlib.dumps({
        "Label": label, "ProgramArguments": program, "RunAtLoad": True, "ProcessType": process_type,
        "ExitTimeOut": int(EXIT_TIMEOUT), "WorkingDirectory": str(log_dir),
        "StandardOutPath": str(log_dir / f"{label}.out.log"), "StandardErrorPath": str(log_dir / f"{label}.err.log"),
    })


@contextmanager
def throwaway_agent(program: list[str], workdir: Path, process_type: str = "Interactive",
                    plist: bytes | None = None, label: str | None = None) -> Iterator[Agent]:
    """Bootstrap a LaunchAgent running ``program`` (or the given ``plist``, whose Label must be ``label``) under
    gui/$UID; on leaving, even by an exception, boot it out, wait until it has left, and delete its plist."""
    label = label or f"{LABEL_PREFIX}.{os.getpid()}.{secrets.token_hex(4)}"
    domain = f"gui/{os.getuid()}"
    status, output = run_command(["launchctl", "print", domain], 30.0)
    if status != 0:
        raise AgentUnavailable(f"no {domain} domain (is anyone logged in at the GUI?): {output[-300:]}")
    path = workdir / f"{label}.plist"
    path.write_bytes(plist if plist is not None else agent_plist(label, program, workdir, process_type))
    launchd = Launchd(system=False, exit_timeout=EXIT_TIMEOUT, echo=lambda line: None)
    launchd.target = f"{launchd.domain}/{label}"
    try:
        launchd.load(str(path))
        yield Agent(label, path, launchd)
    finally:
        try:
            launchd.unload()
        except ManagerError:
            pass  # never loaded, or launchctl itself failed: nothing more this can do
        finally:
            path.unlink(missing_ok=True)
